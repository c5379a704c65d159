"""What a bundle's files may be: named plainly inside the bundle, pinned by the manifest's sha256, and each whole and of
the kind the manifest says, checked before any library parses it.

A sha256 protects against accidental corruption only when the manifest is the one that was exported; these checks
make a manifest that was edited and re-hashed (or a file that a library would misread) a one-line ``BundleError``
naming the file, never a traceback or a crash inside ONNX Runtime, numpy, tokenizers or hnswlib.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ovseg.errors import OvsegError

if TYPE_CHECKING:
    from .manifest import Manifest

FLOAT, INT64 = 1, 7  # ONNX element types
REEXPORT = "re-export the bundle with `ovseg-export --force`"


class BundleError(OvsegError, RuntimeError):
    """A bundle is missing, incomplete or from an incompatible version."""


@dataclass(frozen=True)
class Expect:
    """What an ONNX file of one role takes and gives, as far as the manifest says."""

    role: str  # "CLIP image", "DINOv2", "CLIP text"
    input_type: int  # ONNX TensorProto element type: 1 float, 7 int64
    input_dims: tuple[int | None, ...]  # None: any (batch, length)
    output: str  # the output the runtime reads
    output_width: int | None  # its last dimension (None: not said by the manifest)


def expectations(manifest: Manifest) -> dict[str, Expect]:
    s, t = manifest.clip.image_size, manifest.dinov2.image_size
    return {
        "clip": Expect("CLIP image", FLOAT, (None, 3, s, s), "patch_embeddings", manifest.clip.embed_dim),
        "dinov2": Expect("DINOv2", FLOAT, (None, 3, t, t), "tokens", manifest.dinov2.embed_dim),
        "text": Expect("CLIP text", INT64, (None, None), "text_embeddings", manifest.text.embed_dim),
    }


def named_files(manifest: Manifest) -> dict[str, str]:
    """Every file the manifest names for loading -> its kind: "clip", "dinov2" or "text" (ONNX), "plan", "npy",
    "tokenizer", "names" or "hnsw"."""
    files: dict[str, str] = {}

    def add(name: object, kind: str, where: str) -> None:
        if not isinstance(name, str):
            raise BundleError(f"the manifest's {where} is {name!r}, not a file name: {REEXPORT}")
        files[name] = kind

    for encoder in ("clip", "dinov2"):
        for key, name in _mapping(getattr(manifest, encoder).files, f"{encoder}.files").items():
            add(name, "plan" if key.startswith("trt_") else encoder, f"{encoder}.files.{key}")
    for key, name in _mapping(manifest.text.files, "text.files").items():
        add(name, "text", f"text.files.{key}")
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
        value = _field(manifest, bad[0])
        raise BundleError(f"the manifest's {bad[0]} is {value!r}, which the runtime cannot use: {REEXPORT}")


def _field(manifest: Manifest, dotted: str) -> object:
    first, second = dotted.split(".")
    return getattr(getattr(manifest, first), second)


def check_files(bundle_dir: Path, manifest: Manifest, files: dict[str, str]) -> None:
    """Each named file whole and of its kind (the sha256 check has passed: these catch a re-hashed manifest)."""
    expect = expectations(manifest)
    size, width = manifest.vocabulary.size, manifest.text.embed_dim
    for name, kind in files.items():
        path = bundle_dir / name
        if kind in expect:
            check_onnx(path, manifest.sha256, expect[kind])
        elif kind == "npy":
            check_embeddings(path, size, width)
        elif kind == "tokenizer":
            check_tokenizer(path)
        elif kind == "names":
            read_names(path, size)
        elif kind == "hnsw":
            check_hnsw(path, size, width)
        # a TensorRT plan is opaque: its sha256 and ovseg-build's record of where it was built vouch for it


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


class _Malformed(ValueError):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("a number runs past its message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or start, end) of each field in buf[pos:end]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed("a field runs past the end of the file")
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed("a field runs past the end of the file")
            yield number, wire, pos, pos
        else:
            raise _Malformed(f"wire type {wire}")


def _children(buf: memoryview, start: int, stop: int, number: int, wire: int = 2) -> list:
    """One field of a message: its (start, end) spans (wire 2) or its values (wire 0)."""
    return [(s, e) if wire == 2 else s for n, w, s, e in _fields(buf, start, stop) if n == number and w == wire]


def _string(buf: memoryview, span: tuple[int, int]) -> str:
    return bytes(buf[span[0] : span[1]]).decode("utf-8", "replace")


def _external_data(buf: memoryview, kind: str, pos: int, end: int, found: list[str], depth: int = 0) -> set[int]:
    """Walk one message: external-data locations are appended to ``found``; returns the field numbers seen."""
    if depth > 64:
        raise _Malformed("messages nested too deep")
    seen = set()
    for number, wire, start, stop in _fields(buf, pos, end):
        seen.add(number)
        sub = _SUBMESSAGES.get((kind, number))
        if sub == "entry" and wire == 2:
            if [_string(buf, k) for k in _children(buf, start, stop, 1)] == ["location"]:
                found += [_string(buf, v) for v in _children(buf, start, stop, 2)]
        elif sub is not None and wire == 2:
            _external_data(buf, sub, start, stop, found, depth + 1)
    return seen


def _value_info(buf: memoryview, start: int, stop: int) -> tuple[str, int, tuple[int | None, ...] | None]:
    """A graph input/output: (name, element type, dims with None for symbolic ones; None when no shape is given)."""
    name = next((_string(buf, span) for span in _children(buf, start, stop, 1)), "")
    elem, dims = 0, None
    for s, e in _children(buf, start, stop, 2):  # TypeProto
        for s2, e2 in _children(buf, s, e, 1):  # tensor_type
            elem = next(iter(_children(buf, s2, e2, 1, wire=0)), elem)
            for s3, e3 in _children(buf, s2, e2, 2):  # TensorShapeProto: dim (dim_value, or a symbolic name)
                dims = tuple(
                    next(iter(_children(buf, s4, e4, 1, wire=0)), None) for s4, e4 in _children(buf, s3, e3, 1)
                )
    return name, elem, dims


def _graph_io(buf: memoryview) -> tuple[list, list]:
    graphs = _children(buf, 0, len(buf), 7)
    inputs, outputs = (
        [_value_info(buf, s, e) for gs, ge in graphs for s, e in _children(buf, gs, ge, n)] for n in (11, 12)
    )
    return inputs, outputs


def _tensor(elem: int, dims: tuple[int | None, ...] | None) -> str:
    """ "float Nx3x224x224" for people."""
    name = {FLOAT: "float", INT64: "int64", 10: "float16", 11: "double"}.get(elem, f"ONNX type {elem}")
    return f"{name} {'x'.join('N' if d is None else str(d) for d in dims or ())}".strip()


def _read_onnx(path: Path) -> tuple[set[int], list[str], list, list]:
    """(top-level field numbers, external-data locations, graph inputs, graph outputs) of an ONNX file."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            buf = memoryview(m)
            try:
                found: list[str] = []
                seen = _external_data(buf, "model", 0, len(buf), found)
                return (seen, found, *_graph_io(buf))
            finally:
                buf.release()
    except ValueError as e:  # _Malformed, or mmap of an empty file
        raise corrupt(path, f"not a whole ONNX model: {e}") from None


def check_onnx(path: Path, digests: dict[str, str], expect: Expect) -> None:
    """A whole ONNX model (ir_version and a graph) of the role the manifest gives it, whose external data, if any,
    are files of the bundle that the manifest pins."""
    seen, found, inputs, outputs = _read_onnx(path)
    if not {1, 7} <= seen:
        raise corrupt(path, "not an ONNX model: no IR version or no graph")
    for location in found:
        if not plain_name(location) or location not in digests:
            raise BundleError(
                f"{path} keeps weights in {location!r}, which is not a file of this bundle pinned by its manifest: "
                f"refusing to load it; {REEXPORT}"
            )
    want = _tensor(expect.input_type, expect.input_dims)
    if len(inputs) != 1:
        raise corrupt(path, f"{len(inputs)} inputs, a {expect.role} encoder takes one ({want})")
    _, elem, dims = inputs[0]
    if elem != expect.input_type or not _fits(dims, expect.input_dims):
        raise corrupt(path, f"it takes {_tensor(elem, dims)}, a {expect.role} encoder of this bundle takes {want}")
    last = next((o[2][-1] if o[2] else None for o in outputs if o[0] == expect.output), "missing")
    if last == "missing":
        raise corrupt(path, f"no {expect.output} output: it is not a {expect.role} encoder")
    if None not in (expect.output_width, last) and last != expect.output_width:
        raise corrupt(path, f"its {expect.output} are {last} wide, the manifest says {expect.output_width}")


def _fits(dims: tuple[int | None, ...] | None, want: tuple[int | None, ...]) -> bool:
    """Dims that can be ``want`` (None on either side: any); no shape given fits too."""
    return dims is None or (len(dims) == len(want) and all(None in (d, w) or d == w for d, w in zip(dims, want)))


# --- text embeddings, tokenizer, names ------------------------------------------------------------------------------

EMBEDDING_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def check_embeddings(path: Path, rows: int, dim: int) -> None:
    """A plain (no pickle) float32/float16 .npy of (vocabulary size, text embedding width), whole and finite."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read_header:
                raise ValueError(f".npy format version {version}")
            shape, fortran, dtype = read_header[version](f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, TypeError) as e:
        raise corrupt(path, f"not a .npy array: {' '.join(str(e).split())}") from None
    if dtype not in EMBEDDING_DTYPES:
        raise corrupt(path, f"dtype {dtype}, not float32 or float16")
    if tuple(shape) != (rows, dim) or fortran:
        raise corrupt(path, f"shape {tuple(shape)}, the manifest says ({rows}, {dim})")
    size = path.stat().st_size
    if size != offset + rows * dim * dtype.itemsize:
        raise corrupt(
            path, f"{size} bytes, a ({rows}, {dim}) {dtype} array takes {offset + rows * dim * dtype.itemsize}"
        )
    values = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(rows, dim))
    try:
        finite = bool(np.isfinite(values).all())
    finally:
        del values
    if not finite:
        raise corrupt(path, "it holds NaN or infinite values")


def check_tokenizer(path: Path) -> None:
    """A tokenizers JSON file: one JSON object with a model."""
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise corrupt(path, f"not a tokenizer JSON file: {' '.join(str(e).split())}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), dict):
        raise corrupt(path, "JSON, but not a tokenizers file (no model)")


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
