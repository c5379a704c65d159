"""Bundles edited and re-hashed as an attacker or a bad copy would: files outside the bundle, and every file of the
tiny bundle truncated, emptied, replaced by random bytes, or of another dtype or shape. Each is a one-line refusal
from the API (BundleError / SegmenterError) and from ovseg-run (exit 2), never a traceback or a crash."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import hnswlib
import numpy as np
import pytest

from ovseg.errors import SegmenterError
from ovseg.runtime.bundle.manifest import MANIFEST, BundleError, read_manifest
from ovseg.runtime.config import SegmenterConfig

# the tiny bundle's files (a test checks the fixture has exactly these)
TINY_FILES = (
    "clip_text.fp16.onnx",
    "clip_text.onnx",
    "clip_visual.fp16.onnx",
    "clip_visual.onnx",
    "dinov2.fp16.onnx",
    "dinov2.onnx",
    MANIFEST,
    "text_embeddings.fp16.npy",
    "text_embeddings.fp32.npy",
    "tokenizer.json",
    "vocabulary.hnsw",
    "vocabulary.txt",
)
FRAME = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)


def copy_bundle(src: Path, dst: Path) -> Path:
    """Hard links to the read-only fixture: a variant replaces a file (unlink, then write), never writes into it."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        os.link(p, dst / p.name)
    return dst


def replace(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def edit_manifest(bundle: Path, change: Callable[[dict], None], rehash: bool = True) -> None:
    """Change the manifest, then pin every file's current bytes again (what someone re-signing the bundle does)."""
    path = bundle / MANIFEST
    doc = json.loads(path.read_text())
    change(doc)
    if rehash:
        doc["sha256"] = {
            name: hashlib.sha256((bundle / name).read_bytes()).hexdigest()
            for name in doc["sha256"]
            if (bundle / name).is_file()
        }
    replace(path, json.dumps(doc).encode())


def npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def hnsw_bytes(tmp: Path, count: int, dim: int) -> bytes:
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=count, M=8, random_seed=0)
    index.add_items(np.random.default_rng(0).normal(size=(count, dim)).astype(np.float32), np.arange(count))
    index.save_index(str(tmp))
    return tmp.read_bytes()


GENERIC = ["truncated", "zero-length", "random-bytes"]
VARIANTS = {
    "onnx": [*GENERIC, "swapped"],
    "npy": [*GENERIC, "wrong-dtype", "wrong-shape", "nan", "pickle"],
    "tokenizer": [*GENERIC, "wrong-dtype", "wrong-shape"],
    "names": [*GENERIC, "wrong-dtype", "wrong-shape"],
    "hnsw": [*GENERIC, "wrong-dtype", "wrong-shape", "bad-link"],
    "manifest": [*GENERIC, "wrong-dtype", "wrong-shape"],
}


def kind_of(name: str) -> str:
    if name == MANIFEST:
        return "manifest"
    return {".onnx": "onnx", ".npy": "npy", ".hnsw": "hnsw", ".txt": "names", ".json": "tokenizer"}[Path(name).suffix]


def variants(bundle: Path, name: str, scratch: Path) -> dict[str, bytes]:
    """Bad contents for one file: the generic ones and those of its kind (wrong dtype, wrong shape)."""
    data = (bundle / name).read_bytes()
    rng = np.random.default_rng(len(name))
    out = {
        "truncated": data[: len(data) // 2],
        "zero-length": b"",
        "random-bytes": rng.integers(0, 256, len(data), dtype=np.uint8).tobytes(),
    }
    manifest = json.loads((bundle / MANIFEST).read_text())
    rows, dim = manifest["vocabulary"]["size"], manifest["text"]["embed_dim"]
    kind = kind_of(name)
    if kind == "npy":
        out["wrong-dtype"] = npy(np.zeros((rows, dim), np.float64))
        out["wrong-shape"] = npy(np.zeros((rows, dim + 1), np.float32))
        out["nan"] = npy(np.full((rows, dim), np.nan, np.float32))
        out["pickle"] = np.array([{"a": 1}] * 3, dtype=object).dumps()
    elif kind == "onnx":
        swap = {"clip_text": "clip_visual", "clip_visual": "clip_text", "dinov2": "clip_visual"}
        stem = name.split(".")[0]
        other = name.replace(stem, swap[stem])
        # the text encoder takes int64 ids where the image encoders take float pixels (a dtype error); DINOv2 and
        # CLIP's image encoder take the same pixels and give other outputs (a shape error)
        out["swapped"] = (bundle / other).read_bytes()
    elif kind == "tokenizer":
        out["wrong-dtype"] = b"[1, 2, 3]"
        out["wrong-shape"] = json.dumps({"model": {"type": "BPE"}}).encode()
    elif kind == "names":
        out["wrong-dtype"] = "\n".join(["caf\xe9"] * rows).encode("latin-1")
        out["wrong-shape"] = data.rsplit(b"\n", 2)[0] + b"\n"
    elif kind == "hnsw":
        out["wrong-dtype"] = hnsw_bytes(scratch / "dim.hnsw", rows, dim + 3)
        out["wrong-shape"] = hnsw_bytes(scratch / "count.hnsw", rows + 5, dim)
        bad_link = bytearray(data)
        bad_link[96 + 4 : 96 + 8] = (1 << 30).to_bytes(4, "little")  # element 0's first link
        out["bad-link"] = bytes(bad_link)
    elif kind == "manifest":
        doc = json.loads(data)
        doc["vocabulary"]["size"] = "many"
        out["wrong-dtype"] = json.dumps(doc).encode()
        doc = json.loads(data)
        doc["clip"]["files"] = ["clip_visual.onnx"]
        out["wrong-shape"] = json.dumps(doc).encode()
    return out


def make_variant(tiny_bundle: Path, tmp_path: Path, name: str, variant: str) -> Path:
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    replace(bundle / name, variants(tiny_bundle, name, tmp_path)[variant])
    if name != MANIFEST:
        edit_manifest(bundle, lambda doc: None)
    return bundle


def open_and_run(bundle: Path, name: str) -> None:
    """Everything the runtime reads of ``name``: its precision, HNSW lookup, a frame, a new vocabulary."""
    from ovseg.runtime.segmenter import Segmenter

    precision = "fp16" if ".fp16." in name and "text" not in name else "fp32"
    with Segmenter.from_bundle(bundle, config=SegmenterConfig(precision=precision, lookup="hnsw")) as seg:
        seg(FRAME)
        seg.set_vocabulary(["cat", "dog"])
        seg(FRAME)


def test_the_matrix_covers_every_file_and_variant(tiny_bundle, tmp_path):
    names = {p.name for p in tiny_bundle.iterdir()}
    assert names == set(TINY_FILES)
    assert names == set(read_manifest(tiny_bundle).sha256) | {MANIFEST}
    kinds = {kind_of(n) for n in names}
    assert kinds == {"manifest", "onnx", "npy", "hnsw", "names", "tokenizer"}
    for name in names:
        made = variants(tiny_bundle, name, tmp_path)
        assert list(made) == VARIANTS[kind_of(name)]
        assert set(GENERIC) <= set(made) and {"wrong-dtype", "wrong-shape", "swapped"} & set(made)


def pytest_generate_tests(metafunc):
    if "file_variant" in metafunc.fixturenames:
        # what an ONNX file takes and gives is checked as it is opened, and nothing opens the fp16 text encoder
        unopened = {("clip_text.fp16.onnx", "swapped")}
        params = [(name, v) for name in TINY_FILES for v in VARIANTS[kind_of(name)] if (name, v) not in unopened]
        metafunc.parametrize("file_variant", params, ids=[f"{n}-{v}" for n, v in params])


def test_every_corrupt_file_is_refused_by_the_api(tiny_bundle, tmp_path, file_variant):
    name, variant = file_variant
    bundle = make_variant(tiny_bundle, tmp_path, name, variant)
    with pytest.raises((SegmenterError, BundleError)) as e:
        open_and_run(bundle, name)
    message = str(e.value)
    assert "\n" not in message
    assert name in message or "manifest" in message


def run_cli(bundle: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), FRAME)
    return subprocess.run(
        [sys.executable, "-m", "ovseg.runtime.tools.run", "--bundle", str(bundle), "--image", str(image), "--no-show"]
        + list(extra),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
    )


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0]
    return errors[0]


@pytest.mark.parametrize(
    "name, variant",
    [
        ("text_embeddings.fp32.npy", "truncated"),
        ("tokenizer.json", "zero-length"),
        ("vocabulary.hnsw", "truncated"),
        ("clip_visual.onnx", "random-bytes"),
        ("vocabulary.txt", "wrong-shape"),
        (MANIFEST, "truncated"),
    ],
)
def test_ovseg_run_refuses_a_corrupt_file_in_one_line(tiny_bundle, tmp_path, name, variant):
    bundle = make_variant(tiny_bundle, tmp_path, name, variant)
    assert_refused(run_cli(bundle, tmp_path), name)


def test_a_file_outside_the_bundle_is_refused(tiny_bundle, tmp_path):
    other = copy_bundle(tiny_bundle, tmp_path / "other")
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    assert (other / "clip_visual.onnx").is_file()

    def point_out(doc):
        doc["clip"]["files"]["fp32"] = "../other/clip_visual.onnx"

    edit_manifest(bundle, point_out)
    with pytest.raises(BundleError, match=r"'\.\./other/clip_visual\.onnx'.*not a plain file name"):
        read_manifest(bundle)
    assert_refused(run_cli(bundle, tmp_path), "../other/clip_visual.onnx")


@pytest.mark.parametrize("name", ["/etc/hostname", "..", "sub/clip_visual.onnx", ""])
def test_absolute_parent_and_nested_names_are_refused(tiny_bundle, tmp_path, name):
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")

    def point(doc):
        doc["vocabulary"]["names"] = name
        doc["sha256"][name] = "0" * 64

    edit_manifest(bundle, point, rehash=False)
    with pytest.raises(BundleError, match="not a plain file name"):
        read_manifest(bundle, verify=False)


def test_a_file_missing_from_the_checksum_list_is_refused(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    replace(bundle / "extra.onnx", (tiny_bundle / "clip_visual.onnx").read_bytes())

    def unpinned(doc):
        doc["clip"]["files"]["fp32"] = "extra.onnx"

    edit_manifest(bundle, unpinned)  # rehashes the files the manifest pinned; extra.onnx was never among them
    with pytest.raises(BundleError, match="extra.onnx is named by the manifest but has no sha256"):
        read_manifest(bundle, verify=False)


def test_a_symlink_out_of_the_bundle_is_refused(tiny_bundle, tmp_path):
    other = copy_bundle(tiny_bundle, tmp_path / "other")
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    (bundle / "clip_visual.onnx").unlink()
    (bundle / "clip_visual.onnx").symlink_to(other / "clip_visual.onnx")
    edit_manifest(bundle, lambda doc: None)
    with pytest.raises(BundleError, match="link leading out of the bundle"):
        read_manifest(bundle)
    (bundle / "clip_visual.onnx").unlink()
    (bundle / "clip_visual.onnx").symlink_to("clip_visual.fp16.onnx")  # inside the bundle: allowed
    edit_manifest(bundle, lambda doc: None)
    read_manifest(bundle)


def test_onnx_external_data_must_stay_inside_the_bundle(tiny_bundle, tmp_path):
    import onnx

    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    model = onnx.load(str(bundle / "clip_visual.onnx"))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    (bundle / "w.bin").write_bytes((tmp_path / "w.bin").read_bytes())
    replace(bundle / "clip_visual.onnx", (tmp_path / "ext.onnx").read_bytes())

    def pin(doc):
        doc["sha256"]["w.bin"] = ""

    edit_manifest(bundle, pin)
    read_manifest(bundle)  # external data inside the bundle and pinned: loads
    from ovseg.runtime.segmenter import Segmenter

    with Segmenter.from_bundle(bundle) as seg:
        seg(FRAME)

    (tmp_path / "wb").write_bytes((tmp_path / "w.bin").read_bytes())  # ../wb from inside the bundle
    escaped = (tmp_path / "ext.onnx").read_bytes().replace(b"\x05w.bin", b"\x05../wb")
    assert escaped != (tmp_path / "ext.onnx").read_bytes()
    replace(bundle / "clip_visual.onnx", escaped)
    edit_manifest(bundle, lambda doc: None)
    with pytest.raises(BundleError, match=r"keeps weights in '\.\./wb'"):
        read_manifest(bundle)


def test_every_command_that_reads_a_bundle_refuses_a_corrupt_one_in_one_line(tiny_bundle, tmp_path, capsys):
    """ovseg-build reads the bundle the same way, after checking that TensorRT imports (it does not here)."""
    from ovseg.benchmarks import cli as bench
    from ovseg.calib import cli as calib
    from ovseg.runtime.bundle import signing
    from ovseg.runtime.tools import check

    bundle = make_variant(tiny_bundle, tmp_path, "text_embeddings.fp32.npy", "truncated")
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "0.png"), FRAME)
    (tmp_path / "keys").mkdir()
    key, _ = signing.new_key(tmp_path / "keys" / "k")
    b = ["--bundle", str(bundle)]
    commands = {
        "ovseg-check": lambda: check.main([*b, "--frames", "1"]),
        "ovseg-calib": lambda: calib.main([*b, "--calib-images", str(images)]),
        "ovseg-bench": lambda: bench.main([*b, "--soak", "8"]),
        "ovseg-sign": lambda: signing.main([*b, "--key", str(key)]),
    }
    for prog, run in commands.items():
        assert run() == 2, prog
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "error:" in line]
        assert lines and lines[-1].startswith(f"{prog}: error: bundle file"), (prog, err)
        assert "text_embeddings.fp32.npy is corrupt" in lines[-1] and "Traceback" not in err


@pytest.mark.parametrize(
    "field, value",
    [
        ("text.context_length", "77"),
        ("clip.image_size", 0),
        ("dinov2.grid", [8, "8"]),
        ("clip.std", [0.2, 0.2, 0]),
        ("dinov2.mean", [0.5, 0.5]),
        ("text.templates", "a photo of a {}."),
        ("vocabulary.size", True),
    ],
)
def test_manifest_numbers_the_runtime_computes_with_are_checked(tiny_bundle, tmp_path, field, value):
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    section, key = field.split(".")

    def change(doc):
        doc[section][key] = value

    edit_manifest(bundle, change)
    with pytest.raises(BundleError, match=f"the manifest's {field} is .* which the runtime cannot use"):
        read_manifest(bundle, verify=False)
