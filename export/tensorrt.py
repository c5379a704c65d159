"""TensorRT plans at export time: ovseg-build's builder and check (ovseg.runtime.tools.build), run where tensorrt imports
and can build. Plans are per GPU and TensorRT version: ``ovseg-build`` makes them on the device that runs them.
Nothing here can make an export fail: what TensorRT cannot do is said, and the bundle keeps its ONNX files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ovseg.runtime.bundle.manifest import Manifest
from ovseg.runtime.tools.build import BuildError, BuildOptions, build_dir, load_tensorrt


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot build plans here (it does not import, is older than 10.3, or has no builder), or None."""
    try:
        load_tensorrt()
    except BuildError as e:
        return str(e)
    return None


def export_plans(d: Path, manifest: Manifest, fp16: bool, workspace_mib: int, say: Callable[[str], None]) -> Manifest:
    """The manifest with plans built and checked in ``d`` where TensorRT can; else as it was, having said why."""
    keep = "kept the ONNX files; build plans on the device with `ovseg-build" + (" --fp16`" if fp16 else "`")
    reason = tensorrt_unavailable()
    if reason is not None:
        say(f"no TensorRT plans ({reason}); {keep}")
        return manifest
    before = {p.name for p in d.glob("*.plan")}
    try:
        return build_dir(d, manifest, BuildOptions(d, fp16=fp16, workspace_mib=workspace_mib), load_tensorrt(), say)
    except Exception as e:  # TensorRT and CUDA raise their own types; none of them may discard the export
        for p in d.glob("*.plan"):
            if p.name not in before:
                p.unlink()
        say(f"no TensorRT plans ({type(e).__name__}: {' '.join(str(e).split())}); {keep}")
        return manifest
