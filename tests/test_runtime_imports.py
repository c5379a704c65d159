"""The lean-runtime rule: importing and using the runtime never loads torch, open_clip or transformers."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "open_clip", "transformers")


def imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_importing_the_segmenter_leaves_torch_out():
    assert imported_after("import ovseg.runtime.segmenter") == set()
    assert imported_after("from ovseg.runtime import Segmenter, SegmenterError, Result, Segment") == set()


def test_running_the_segmenter_leaves_torch_out(tiny_bundle):
    code = (
        "import numpy as np\nfrom ovseg.runtime import Segmenter, SegmenterConfig\n"
        f"seg = Segmenter.from_bundle({str(tiny_bundle)!r}, backend='cpu', classes=['cat', 'dog'], "
        "config=SegmenterConfig(refine='segments'))\n"
        "seg(np.zeros((20, 30, 3), np.uint8)); seg.set_classes(None); seg.set_vocabulary(['a', 'b'])\n"
        "seg.render(np.zeros((20, 30), np.uint8), seg(np.zeros((20, 30), np.uint8)))"
    )
    assert imported_after(code) == set()


def test_the_shared_core_and_the_export_help_leave_torch_out():
    """ovseg/ (errors, CLI runner, constants, install check) serves both sides; ovseg-export --help needs no torch."""
    assert (
        imported_after("import ovseg.cli, ovseg.constants, ovseg.environment, ovseg.errors, ovseg.onnx_helpers")
        == set()
    )
    assert imported_after("import ovseg.export.cli as c; c.build_parser()") == set()
