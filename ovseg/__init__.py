"""ovseg: open-vocabulary semantic segmentation for live video on the edge.

The package root holds what every side shares and nothing heavy: the version, the one error base
(``ovseg.errors``), the CLI runner (``ovseg.cli``), constants (``ovseg.constants``), the install check (``ovseg.environment``) and the ONNX helpers
that export, calibration and benchmarks have in common (``ovseg.onnx_helpers``). It imports no torch, no
onnxruntime and no numpy, so the lean runtime and the build side can both depend on it.
"""

__version__ = "0.1.0"
