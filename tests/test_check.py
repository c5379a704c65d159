"""ovseg-check on the tiny bundle: the CPU precisions pass, a broken model fails its row, what this machine cannot run
is skipped with the reason, a session on another provider than asked fails, and a missing bundle is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from ovseg.runtime.bundle.manifest import sha256_file
from ovseg.runtime.io.sources import SourceError
from ovseg.runtime.tools import check

CPU_ONLY = ["CPUExecutionProvider"]
FRAMES = ["--frames", "2"]


@pytest.fixture
def cpu_only(monkeypatch):
    """This machine's ONNX Runtime, as far as the check and the Segmenter see, has the CPU provider only."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(CPU_ONLY))


@dataclass
class Line:
    text: str
    status: str
    note: str


def rows(stdout: str) -> dict[tuple[str, str], Line]:
    """The table's rows by (backend, precision), cut at the header's column positions."""
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("backend"))
    at_status, at_note = header.index("status"), header.index("note")
    table = {}
    for line in lines:
        cells = line.split()
        if len(cells) > 2 and cells[0] in check.CHECKED_BACKENDS and cells[1] in check.CHECKED_PRECISIONS:
            table[(cells[0], cells[1])] = Line(line, line[at_status:].split()[0], line[at_note:])
    return table


def add_int8(bundle_copy, change) -> Path:
    """Give the bundle "int8" encoders: copies of the fp32 files passed through ``change(encoder, model)``, signed in
    the manifest like every bundle file."""
    d = bundle_copy.dir
    manifest = json.loads((d / "manifest.json").read_text())
    written = {}
    for e in check.ENCODERS:
        fp32 = d / manifest[e]["files"]["fp32"]
        out = fp32.with_name(fp32.name.removesuffix(".onnx") + ".int8.onnx")
        model = onnx.load(str(fp32))
        change(e, model, out)
        if not out.exists():
            onnx.save(model, str(out))
        written[e] = out

    def sign(m):
        for e, out in written.items():
            m[e]["files"]["int8"] = out.name
            m["sha256"][out.name] = sha256_file(out)

    return bundle_copy(sign)


def scramble_dinov2(e: str, model: onnx.ModelProto, out: Path) -> None:
    if e != "dinov2":
        return
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(weight)
    shuffled = np.random.default_rng(0).permutation(values.ravel()).reshape(values.shape)
    weight.CopyFrom(numpy_helper.from_array(shuffled, weight.name))


def test_the_cpu_precisions_pass_print_the_table_and_the_json(tiny_bundle, cpu_only, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert check.main(["--bundle", str(tiny_bundle), *FRAMES, "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    print(stdout)
    table = rows(stdout)
    assert "backend" in stdout and "worst cos" in stdout and "ms/frame" in stdout
    assert table[("cpu", "fp32")].status == check.REF and table[("cpu", "fp16")].status == check.PASS
    assert "ORT CPU" in table[("cpu", "fp16")].text
    assert "passed:" in stdout and "frames of the sample clip" in stdout
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["frame_count"] == 2
    fp16 = next(r for r in report["rows"] if (r["backend"], r["precision"]) == ("cpu", "fp16"))
    assert fp16["min_cosine"] >= check.DEFAULT_COSINE and fp16["label_agreement"] >= check.DEFAULT_AGREEMENT
    assert set(fp16["encoders"]) == set(check.ENCODERS)
    assert (
        "patch_embeddings" in fp16["encoders"]["clip"]["outputs"] and "tokens" in fp16["encoders"]["dinov2"]["outputs"]
    )


def test_backends_this_onnxruntime_lacks_are_skipped_with_the_reason(tiny_bundle, cpu_only, capsys):
    assert check.main(["--bundle", str(tiny_bundle), *FRAMES]) == 0
    table = rows(capsys.readouterr().out)
    for backend, provider in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        for precision in check.CHECKED_PRECISIONS:
            assert table[(backend, precision)].status == check.SKIP
            assert f"this onnxruntime has no {provider}" in table[(backend, precision)].note
    assert table[("cpu", "int8")].status == check.SKIP
    assert "the bundle has no int8 files" in table[("cpu", "int8")].note


def test_a_broken_int8_model_fails_its_row_and_the_exit_status(bundle_copy, cpu_only, tmp_path, capsys):
    bundle = add_int8(bundle_copy, scramble_dinov2)
    images = tmp_path / "images"
    images.mkdir()
    for i, frame in enumerate(check.synthetic_frames(2)):
        cv2.imwrite(str(images / f"{i}.png"), frame)
    assert check.main(["--bundle", str(bundle), "--images", str(images)]) == 1
    stdout = capsys.readouterr().out
    print(stdout)
    table = rows(stdout)
    assert table[("cpu", "int8")].status == check.FAIL
    assert "dinov2" in table[("cpu", "int8")].note and "< 0.98" in table[("cpu", "int8")].note
    assert table[("cpu", "fp16")].status == check.PASS
    assert "FAILED: cpu int8" in stdout and "2 image(s) from" in stdout


def test_a_session_that_cannot_open_fails_its_row_with_the_reason(bundle_copy, cpu_only, capsys):
    def garbage(e, model, out):
        model.graph.node[0].op_type = "NoSuchOperator"  # a whole ONNX file that no session can open

    bundle = add_int8(bundle_copy, garbage)
    assert check.main(["--bundle", str(bundle), *FRAMES]) == 1
    table = rows(capsys.readouterr().out)
    assert table[("cpu", "int8")].status == check.FAIL
    assert "cannot open" in table[("cpu", "int8")].note and ".int8.onnx" in table[("cpu", "int8")].note


def test_a_session_on_another_provider_than_asked_fails_never_falls_back(tiny_bundle, monkeypatch, capsys):
    """An onnxruntime that lists CUDA but cannot create it (here: the CPU build, told it has CUDA) runs on the CPU
    unless something checks; the cuda rows fail, saying so (where the probe passed), or skip with the probe's reason."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *CPU_ONLY])
    monkeypatch.setattr(check, "provider_problem", lambda provider: "no NVIDIA driver (libcuda.so.1 does not load)")
    assert check.main(["--bundle", str(tiny_bundle), "--frames", "1"]) == 0
    table = rows(capsys.readouterr().out)
    assert table[("cuda", "fp32")].status == check.SKIP and "no NVIDIA driver" in table[("cuda", "fp32")].note
    monkeypatch.setattr(check, "provider_problem", lambda provider: None)
    assert check.main(["--bundle", str(tiny_bundle), "--frames", "1"]) == 1
    table = rows(capsys.readouterr().out)
    for precision in ("fp32", "fp16"):
        assert table[("cuda", precision)].status == check.FAIL
        assert "CUDA" in table[("cuda", precision)].note or "cuda" in table[("cuda", precision)].note
    assert table[("cpu", "fp16")].status == check.PASS


def test_without_the_sample_photos_it_uses_synthetic_frames_and_says_so(tiny_bundle, cpu_only, monkeypatch, capsys):
    def no_skimage(path):
        raise SourceError("the sample clip needs scikit-image: pip install scikit-image, or pass --video PATH")

    monkeypatch.setattr(check, "sample_clip", no_skimage)
    frames = check.load_frames(None, 3)
    assert "synthetic" in frames.source and "scikit-image" in frames.source
    again = check.synthetic_frames(3)
    assert all(
        a.shape == (480, 640, 3) and a.dtype == np.uint8 and np.array_equal(a, b) for a, b in zip(frames.images, again)
    )
    assert check.main(["--bundle", str(tiny_bundle), "--frames", "1"]) == 0
    assert "frames: 1 synthetic frame (shapes on gradients)" in capsys.readouterr().out


def test_a_missing_bundle_exits_2_with_one_line(tmp_path, capsys):
    assert check.main(["--bundle", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ovseg-check: error: no bundle at"), err


def test_python_m_runs_it_without_torch(tiny_bundle):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['ovseg-check', '--bundle', {str(tiny_bundle)!r}, '--frames', '1']\n"
        "try:\n    runpy.run_module('ovseg.runtime.tools.check', run_name='__main__')\n"
        "except SystemExit as e:\n    rc = e.code\n"
        "print('rc', rc, 'torch', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "rc 0 torch False", out.stdout + out.stderr
    assert "cpu       fp16" in out.stdout


def test_a_manifest_with_gpu_verdicts_of_an_older_ovseg_loads(bundle_copy):
    from ovseg.runtime.bundle.manifest import read_manifest

    bundle = bundle_copy(
        lambda m: m.update(device_checks={"NVIDIA H200, compute 9.0": {"cuda/fp16": {"passed": True}}})
    )
    assert read_manifest(bundle).clip.files  # the old field is dropped, the rest reads
