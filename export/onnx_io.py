"""ONNX export and the check every exported file passes: onnx.checker, then ONNX Runtime vs torch."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ovseg.onnx_helpers import row_cosines, session_options

from .errors import ExportError

# Opset 17 has LayerNormalization and runs on onnxruntime >= 1.12 and TensorRT >= 8.6 (JetPack 5/6).
OPSET = 17
# The IR version that goes with opset 17. onnx 1.23 would stamp IR 14, which onnxruntime 1.31 refuses.
IR_VERSION = 8


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Trace ``module`` to ``path`` at OPSET / IR_VERSION and run onnx.checker on the result."""
    module = module.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused inference kernel has no ONNX symbolic; trace the composite ops instead.
    torch.backends.mha.set_fastpath_enabled(False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        try:
            torch.onnx.export(
                module,
                example_inputs,
                str(path),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes or {},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def check_parity(
    path: Path,
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    output_names: Sequence[str],
    min_cosine: float = 0.9999,
) -> dict[str, float]:
    """Run ``module`` in torch and ``path`` in ONNX Runtime on the same inputs and compare every output: the manifest's
    checks, ``OUTPUT.min_cosine`` (the worst per-token cosine) and ``OUTPUT.max_abs_diff``.

    Raises ExportError when any output's worst per-token cosine is below ``min_cosine``.
    """
    with torch.no_grad():
        expected = module.eval()(*inputs.values())
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    got = run_onnx(path, {k: v.numpy() for k, v in inputs.items()})
    checks = {}
    for name, want, have in zip(output_names, expected, got):
        want = want.float().numpy()
        if want.shape != have.shape:
            raise ExportError(
                f"{path.name}: output {name} has shape {have.shape} in ONNX Runtime but {want.shape} in torch"
            )
        worst = float(row_cosines(want, have).min())
        if not np.isfinite(worst) or worst < min_cosine:
            raise ExportError(
                f"{path.name}: output {name} differs from torch (worst token cosine {worst:.6f} < {min_cosine})"
            )
        checks[f"{name}.min_cosine"] = worst
        checks[f"{name}.max_abs_diff"] = float(np.abs(want - have.astype(np.float32)).max())
    return checks
