"""What a bundle's files may be: named plainly inside the bundle, pinned by the manifest's sha256, and whole.

A sha256 protects against accidental corruption only when the manifest is the one that was exported; these checks
make a manifest that was edited and re-hashed a one-line ``BundleError`` naming the file, never a read outside the
bundle, a traceback or a crash inside numpy or hnswlib. What a library refuses in one line as a file is opened (a
tokenizer, an encoder's inputs and outputs) is said there, naming the file.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ovseg.errors import OvsegError, one_line

if TYPE_CHECKING:
    from .manifest import Manifest

REEXPORT = "re-export the bundle with `ovseg-export --force`"


class BundleError(OvsegError, RuntimeError):
    """A bundle is missing, incomplete or from an incompatible version."""


def named_files(manifest: Manifest) -> dict[str, str]:
    """Every file the manifest names for loading -> its kind: "onnx", "plan", "npy", "tokenizer", "names" or "hnsw"."""
    files: dict[str, str] = {}

    def add(name: object, kind: str, where: str) -> None:
        if not isinstance(name, str):
            raise BundleError(f"the manifest's {where} is {name!r}, not a file name: {REEXPORT}")
        files[name] = kind

    for encoder in ("clip", "dinov2"):
        for key, name in _mapping(getattr(manifest, encoder).files, f"{encoder}.files").items():
            add(name, "plan" if key.startswith("trt_") else "onnx", f"{encoder}.files.{key}")
    for key, name in _mapping(manifest.text.files, "text.files").items():
        add(name, "onnx", f"text.files.{key}")
    add(manifest.text.tokenizer, "tokenizer", "text.tokenizer")
    add(manifest.vocabulary.names, "names", "vocabulary.names")
    for key, name in _mapping(manifest.vocabulary.embeddings, "vocabulary.embeddings").items():
        add(name, "npy", f"vocabulary.embeddings.{key}")
    if manifest.vocabulary.hnsw:
        add(manifest.vocabulary.hnsw, "hnsw", "vocabulary.hnsw")
    return files


def _mapping(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise BundleError(f"the manifest's {where} is {value!r}, not a mapping of file names: {REEXPORT}")
    return value


def plain_name(name: str) -> bool:
    """A file directly inside the bundle: no directory part, no parent, nothing absolute."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def confine(bundle_dir: Path, manifest: Manifest) -> dict[str, str]:
    """Refuse a manifest that names a file outside the bundle or one it does not pin by sha256; returns named_files."""
    files = named_files(manifest)
    digests = _mapping(manifest.sha256, "sha256")
    root = bundle_dir.resolve()
    for name in [*digests, *files]:
        if not isinstance(name, str) or not plain_name(name):
            raise BundleError(
                f"the manifest names {name!r}, which is not a plain file name inside {bundle_dir}: refusing to load it; {REEXPORT}"
            )
        path = bundle_dir / name
        if path.is_symlink() and path.resolve().parent != root:
            raise BundleError(
                f"bundle file {path} is a link leading out of the bundle (to {path.resolve()}): refusing to load it; copy the file in instead"
            )
    unpinned = sorted(set(files) - set(digests))
    if unpinned:
        raise BundleError(
            f"bundle file {bundle_dir / unpinned[0]} is named by the manifest but has no sha256 in it: refusing to load it; {REEXPORT}"
        )
    return files


def check_fields(manifest: Manifest) -> None:
    """The manifest's sizes are positive whole numbers and its normalisation numbers are numbers: the runtime computes
    with them."""

    def positive(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    def numbers(values: object, n: int) -> bool:
        return isinstance(values, tuple) and len(values) == n and all(isinstance(v, (int, float)) for v in values)

    fields: dict[str, bool] = {
        "vocabulary.size": positive(manifest.vocabulary.size),
        "text.embed_dim": positive(manifest.text.embed_dim),
        "text.context_length": positive(manifest.text.context_length),
        "text.logit_scale": isinstance(manifest.text.logit_scale, (int, float)),
        "text.templates": isinstance(manifest.text.templates, list)
        and all(isinstance(t, str) for t in manifest.text.templates),
    }
    for e in ("clip", "dinov2"):
        info = getattr(manifest, e)
        for key in ("image_size", "patch_size", "embed_dim"):
            fields[f"{e}.{key}"] = positive(getattr(info, key))
        fields[f"{e}.grid"] = numbers(info.grid, 2) and all(positive(g) for g in info.grid)
        fields[f"{e}.mean"] = numbers(info.mean, 3)
        fields[f"{e}.std"] = numbers(info.std, 3) and all(v > 0 for v in info.std)
    bad = [name for name, ok in fields.items() if not ok]
    if bad:
        section, key = bad[0].split(".")
        value = getattr(getattr(manifest, section), key)
        raise BundleError(f"the manifest's {bad[0]} is {value!r}, which the runtime cannot use: {REEXPORT}")


def check_files(bundle_dir: Path, manifest: Manifest, files: dict[str, str]) -> None:
    """Each named file whole (the sha256 check has passed: these catch a re-hashed manifest). A TensorRT plan is opaque:
    its sha256 and ovseg-build's record of where it was built vouch for it; the tokenizer, ONNX Runtime and the
    encoders' inputs and outputs are checked as they are opened, each failure one line naming the file."""
    size, width = manifest.vocabulary.size, manifest.text.embed_dim
    for name, kind in files.items():
        path = bundle_dir / name
        if kind == "onnx":
            check_onnx(path, manifest.sha256)
        elif kind == "npy":
            check_embeddings(path, size, width)
        elif kind == "names":
            read_names(path, size)
        elif kind == "hnsw":
            check_hnsw(path, size, width)


def corrupt(path: Path, why: str) -> BundleError:
    return BundleError(f"bundle file {path} is corrupt ({why}): {REEXPORT}, or copy the bundle again")


# --- ONNX: a protobuf walk for whole messages and external data ----------------------------------------------------

# (message, field number) -> the message type a length-delimited field holds; other fields are skipped.
_SUBMESSAGES = {
    ("model", 7): "graph",
    ("model", 25): "function",
    ("function", 7): "node",
    ("graph", 1): "node",
    ("graph", 5): "tensor",
    ("graph", 15): "sparse",
    ("node", 5): "attribute",
    ("attribute", 5): "tensor",
    ("attribute", 6): "graph",
    ("attribute", 10): "tensor",
    ("attribute", 11): "graph",
    ("attribute", 22): "sparse",
    ("attribute", 23): "sparse",
    ("sparse", 1): "tensor",
    ("sparse", 2): "tensor",
    ("tensor", 13): "entry",
}


def _varint(buf: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("a number runs past its message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: mmap.mmap, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field in buf[pos:end]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
            continue
        if wire == 2:
            length, pos = _varint(buf, pos, end)
        elif wire in (1, 5):
            length = 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos + length > end:
            raise ValueError("a field runs past the end of the file")
        yield number, wire, pos, pos + length
        pos += length


def _strings(buf: mmap.mmap, start: int, stop: int, number: int) -> list[str]:
    """The string field ``number`` of the message buf[start:stop], each time it occurs."""
    return [buf[s:e].decode("utf-8", "replace") for n, w, s, e in _fields(buf, start, stop) if (n, w) == (number, 2)]


def _external_data(buf: mmap.mmap, kind: str, pos: int, end: int, found: list[str], depth: int = 0) -> set[int]:
    """Walk one message: external-data locations are appended to ``found``; returns the field numbers seen."""
    if depth > 64:
        raise ValueError("messages nested too deep")
    seen = set()
    for number, wire, start, stop in _fields(buf, pos, end):
        seen.add(number)
        sub = _SUBMESSAGES.get((kind, number))
        if sub == "entry" and wire == 2:
            if _strings(buf, start, stop, 1) == ["location"]:
                found += _strings(buf, start, stop, 2)
        elif sub is not None and wire == 2:
            _external_data(buf, sub, start, stop, found, depth + 1)
    return seen


def check_onnx(path: Path, digests: dict[str, str]) -> None:
    """A whole ONNX model (ir_version and a graph) whose external data, if any, are files of the bundle that the
    manifest pins."""
    found: list[str] = []
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            seen = _external_data(buf, "model", 0, len(buf), found)
    except ValueError as e:  # a malformed message, or mmap of an empty file
        raise corrupt(path, f"not a whole ONNX model: {e}") from None
    if not {1, 7} <= seen:
        raise corrupt(path, "not an ONNX model: no IR version or no graph")
    for location in found:
        if not plain_name(location) or location not in digests:
            raise BundleError(
                f"{path} keeps weights in {location!r}, which is not a file of this bundle pinned by its manifest: "
                f"refusing to load it; {REEXPORT}"
            )


# --- text embeddings, names -------------------------------------------------------------------------------------------


def check_embeddings(path: Path, rows: int, dim: int) -> None:
    """A plain (no pickle) float32/float16 .npy of (vocabulary size, text embedding width), whole and finite."""
    try:
        values = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise corrupt(path, f"not a .npy array: {one_line(e)}") from None
    if not isinstance(values, np.ndarray) or values.dtype not in (np.float32, np.float16):
        raise corrupt(path, f"dtype {getattr(values, 'dtype', None)}, not float32 or float16")
    if values.shape != (rows, dim):
        raise corrupt(path, f"shape {values.shape}, the manifest says ({rows}, {dim})")
    if not np.isfinite(values).all():
        raise corrupt(path, "it holds NaN or infinite values")


def read_names(path: Path, size: int) -> list[str]:
    """The vocabulary file's names, one per line, as many as the manifest says."""
    try:
        names = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise corrupt(path, f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    if len(names) != size or not all(n.strip() for n in names):
        raise corrupt(
            path, f"{len(names)} lines ({sum(not n.strip() for n in names)} blank), the manifest says {size} names"
        )
    return names


# --- hnswlib index ----------------------------------------------------------------------------------------------------

# hnswlib's saveIndex header: offsetLevel0, max_elements, cur_element_count, size_data_per_element, label_offset,
# offsetData (size_t), maxlevel (int), enterpoint_node (uint32), maxM, maxM0, M (size_t), mult (double), ef_construction.
_HNSW_HEADER = struct.Struct("<6QiI3QdQ")


def check_hnsw(path: Path, count: int, dim: int) -> None:
    """An hnswlib index of ``count`` vectors of ``dim`` floats whose every link and label is in range: hnswlib reads a
    file it wrote without such checks, and a bad link there is a crash."""
    data = path.read_bytes()
    if len(data) < _HNSW_HEADER.size:
        raise corrupt(path, f"{len(data)} bytes, shorter than an hnswlib index header")
    (offset0, _max, n, per_element, label_offset, offset_data, max_level, entry, max_m, max_m0, m, _mult, _ef) = (
        _HNSW_HEADER.unpack_from(data)
    )
    if n != count:
        raise corrupt(path, f"an index of {n} entries, the manifest says {count}")
    links0 = max_m0 * 4 + 4
    layout = (offset0, offset_data, label_offset, per_element) == (0, links0, links0 + dim * 4, links0 + dim * 4 + 8)
    if not (layout and 0 < m <= max_m <= max_m0 <= 4096 and 0 <= max_level < 64 and 0 <= entry < n):
        raise corrupt(path, f"its header does not describe an index of {dim}-dimensional vectors")
    end = _HNSW_HEADER.size + n * per_element
    if end > len(data):
        raise corrupt(path, "truncated")
    level0 = np.frombuffer(data, np.uint8, n * per_element, _HNSW_HEADER.size).reshape(n, per_element)
    sizes = level0[:, :4].copy().view(np.uint32)[:, 0] & 0xFFFF
    links = level0[:, 4:links0].copy().view(np.uint32)
    labels = level0[:, label_offset:].copy().view(np.uint64)[:, 0]
    used = np.arange(max_m0)[None, :] < sizes[:, None]
    if (sizes > max_m0).any() or (links[used] >= n).any() or (labels >= count).any():
        raise corrupt(path, "links or labels out of range")
    _check_upper_levels(path, data, end, n, max_m, max_level)


def _check_upper_levels(path: Path, data: bytes, pos: int, n: int, max_m: int, max_level: int) -> None:
    """After level 0, each of the ``n`` elements' upper levels: a byte count, then per level a link count and links."""
    per_level = max_m * 4 + 4
    for _ in range(n):
        if pos + 4 > len(data):
            raise corrupt(path, "truncated")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if size % per_level or size // per_level > max_level or pos + size > len(data):
            raise corrupt(path, "an element's upper levels do not fit the index")
        for start in range(pos, pos + size, per_level):
            k = struct.unpack_from("<I", data, start)[0] & 0xFFFF
            if k > max_m or any(x >= n for x in struct.unpack_from(f"<{k}I", data, start + 4)):
                raise corrupt(path, "links out of range")
        pos += size
    if pos != len(data):
        raise corrupt(path, f"{len(data) - pos} bytes after the index")
