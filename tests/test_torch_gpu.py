"""The torch side on a CUDA GPU (`pytest -m gpu`; `make gpu-check` runs each test as a step): the export's modules
traced on CUDA, ovseg-train with mixed precision under torchrun, steps of the synthetic tiny CLIP's pretraining.
fp32 is compared with TF32 off. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys

import cv2
import numpy as np
import open_clip
import pytest
import torch
import torch.distributed as dist
from conftest import TINY_SIZE
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from ovseg.benchmarks.synthetic import pretrain
from ovseg.benchmarks.synthetic.scenes import render, sample_layout
from ovseg.export import dinov2 as dino
from ovseg.export.clip import ClipDenseVisual, ClipTextEncoder, tiny_clip
from ovseg.export.onnx_io import export_onnx, run_onnx
from ovseg.onnx_helpers import row_cosines

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=f"torch {torch.__version__} sees no CUDA device"),
]
CUDA = torch.device("cuda")
# Worst per-row cosine of torch on CUDA vs the CPU. float32 reorderings leave 1 - cos ~1e-13 (measured between ONNX
# Runtime and torch on these models); TF32 (10-bit mantissa, relative errors ~1e-3) would leave ~1e-6.
SAME_FP32 = 1 - 1e-9
ONNX_PARITY = 0.9999  # check_parity's default: what every exported file must reach against torch


@pytest.fixture(autouse=True)
def fp32():
    """fp32 means fp32: torch's CUDA matmuls and cuDNN convolutions may otherwise take TF32 (10-bit mantissas)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _close(want: torch.Tensor, have, min_cosine: float, what: str) -> None:
    want = want.detach().float().cpu().numpy()
    have = have.detach().float().cpu().numpy() if isinstance(have, torch.Tensor) else have
    assert have.shape == want.shape, what
    cos = row_cosines(want, have).min()
    assert cos >= min_cosine, f"{what}: 1 - worst row cosine = {1 - cos:.1e} > {1 - min_cosine:.0e}"
    error = np.abs(want - have).max() / np.abs(want).max()  # the cosine ignores scale; float32 gave < 1e-6 here
    assert error <= 1e-4, f"{what}: largest difference {error:.2e} of the largest value"


def test_export_traced_on_cuda_matches_the_cpu_and_onnxruntime(tmp_path):
    """Each module the export writes (the tests' tiny CLIP in each dense method, its text tower, the tiny DINOv2),
    moved to CUDA: its outputs equal the CPU's, and the ONNX file traced from it on CUDA runs in ONNX Runtime (CPU)
    to the export's parity."""
    image = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0))
    ids = open_clip.tokenize(["a photo of a forklift.", "wet floor", "person"])
    cases = [
        (f"clip_visual_{m}", ClipDenseVisual(tiny_clip().visual, TINY_SIZE, m), image, ["image_embedding", "patches"])
        for m in ("pixelclip", "gem", "maskclip")
    ]
    cases.append(("clip_text", ClipTextEncoder(tiny_clip()), ids, ["text_embeddings"]))
    tokens = dino.Dinov2PatchTokens(dino.random_dinov2(dino.tiny_dinov2_config()), TINY_SIZE)
    cases.append(("dinov2", tokens, image, ["tokens"]))
    for name, module, x, outputs in cases:
        module = module.eval()
        on_gpu = copy.deepcopy(module).to(CUDA)
        with torch.no_grad():
            cpu, gpu = module(x), on_gpu(x.to(CUDA))
        cpu, gpu = (cpu,) if isinstance(cpu, torch.Tensor) else cpu, (gpu,) if isinstance(gpu, torch.Tensor) else gpu
        assert all(t.device.type == CUDA.type for t in gpu), name
        path = export_onnx(on_gpu, (x.to(CUDA),), tmp_path / f"{name}.onnx", ["x"], outputs, {"x": {0: "batch"}})
        got = run_onnx(path, {"x": x.numpy()})
        for output, want, have, onnx_out in zip(outputs, cpu, gpu, got):
            _close(want, have, SAME_FP32, f"{name}.{output}: CUDA vs CPU")
            _close(have, onnx_out, ONNX_PARITY, f"{name}.{output}: ONNX Runtime vs torch on CUDA")


def _write_images(folder, count: int = 8) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        image = render(sample_layout(rng, size=(96, 128))).image
        cv2.imwrite(str(folder / f"scene_{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def test_ovseg_train_with_mixed_precision_under_torchrun(tmp_path):
    """ovseg-train under torchrun (one process) on the synthetic tiny CLIP's architecture with random weights, masks
    from a random DINOv2-small through the native k-means: 3 steps with mixed precision (bf16, or fp16 with loss
    scaling) and 3 with --fp32, from the same weights and data. Both finish with finite losses; their first losses
    differ (autocast ran) by no more than precision can explain (the same data and weights)."""
    _write_images(tmp_path / "images")
    first = {}
    for run, flags in (("amp", []), ("fp32", ["--fp32"])):
        out = tmp_path / run
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
        command += ["-m", "ovseg.export.train.cli", "--data", str(tmp_path / "images"), "--out", str(out)]
        command += ["--clip", str(pretrain.CONFIG), "--random-weights", "--masks", "dino", "--dinov2", "dinov2-small"]
        command += ["--dino-size", "112", "--dino-clusters", "4", "--iters", "3", "--batch", "4", "--prompts", "8"]
        command += ["--short-side", "96", "--crop", "64", "--clip-size", "128", "--mask-size", "32"]
        command += ["--workers", "2", "--no-names", *flags]
        done = subprocess.run(command, capture_output=True, text=True, timeout=110)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        assert "ovseg-export --clip-weights" in done.stdout
        assert json.loads((out / "config.json").read_text())["amp"] is (run == "amp")
        with (out / "log.csv").open() as f:
            losses = [float(row["loss"]) for row in csv.DictReader(f)]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
        assert (out / "student_visual.safetensors").stat().st_size > 0
        first[run] = losses[0]
    assert first["amp"] != first["fp32"], "mixed precision changed nothing: did autocast run?"
    assert abs(first["amp"] - first["fp32"]) < 0.1 * first["fp32"], first

    # One process makes no process group; several GPUs reduce over NCCL: it must run on this GPU.
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.arange(4.0, device=CUDA)
        dist.all_reduce(x)
        assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        dist.destroy_process_group()


def test_pretraining_steps_on_cuda():
    """The synthetic tiny CLIP's pretraining (pretrain.py's model, batches and loss) on CUDA: one step's loss and
    gradients equal the CPU's, then 30 AdamW steps fit that batch (chance is log 32 = 3.47; on the CPU the loss fell
    from 3.67 to 2.48 in 25 steps). lr 3e-4: without pretrain.py's warm-up, 1e-3 falls to chance and stays there."""
    name = pretrain.register()
    tokenizer = open_clip.get_tokenizer(name)
    torch.manual_seed(0)
    cpu = open_clip.create_model(name, pretrained=None).train()
    loader = DataLoader(pretrain.CaptionedScenes(32, seed=0), batch_size=None, num_workers=1)  # as pretrain.py loads
    images, captions, keys = next(iter(loader))
    text = tokenizer(captions)
    model = copy.deepcopy(cpu).to(CUDA)

    def step(model) -> torch.Tensor:
        device = next(model.parameters()).device
        image, text_features, scale = model(images.to(device), text.to(device))[:3]
        loss = pretrain.contrastive_loss(image, text_features, scale, keys.to(device))
        loss.backward()
        return loss

    with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels may round otherwise; the 30 steps below use them
        want, have = step(cpu), step(model)
    assert have.item() == pytest.approx(want.item(), rel=1e-5)
    grads = [torch.cat([p.grad.flatten().cpu() for p in m.parameters()]) for m in (cpu, model)]
    _close(grads[0][None], grads[1][None], SAME_FP32, "gradients, CUDA vs CPU")

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    losses = []
    for _ in range(30):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(step(model).item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.85 * want.item(), (want.item(), losses)
