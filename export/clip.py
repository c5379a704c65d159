"""CLIP for export: loading (open_clip, local or PixelCLIP checkpoints), the dense visual encoder, the text encoder."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transformer import VisionTransformer
from torch import nn

from ovseg.constants import DEFAULT_CLIP, DENSE_METHODS

from .errors import ExportError, WeightsUnavailable, patch_grid
from .hub import hub_reachable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GEM_DEPTH = 6  # TAG applies self-self attention to the last 6 blocks


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """``MODEL[:PRETRAINED]``: MODEL is an open_clip model name, or an open_clip model config file (``NAME.json``, a
    custom architecture) that is registered under its file name."""
    model, _, pretrained = spec.partition(":")
    if model.endswith(".json"):
        config = Path(model).expanduser()
        if not config.is_file():
            raise ExportError(f"--clip {model}: no such open_clip model config file")
        open_clip.add_model_config(config)
        model = config.stem
    if model not in open_clip.list_models():
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-")]
        raise ExportError(
            f"unknown CLIP model {model!r}: choose one of {', '.join(vits[:12])}, ... (open_clip.list_models())"
        )
    return model, pretrained or None


def load_clip(
    spec: str = DEFAULT_CLIP, weights: str | Path | None = None, random_weights: bool = False
) -> tuple[open_clip.CLIP, str]:
    """Build an open_clip CLIP from ``MODEL[:PRETRAINED]``; returns the model (eval, fp32) and where its weights came from.

    ``weights`` is a local checkpoint: open_clip's, OpenAI's state dict, or a PixelCLIP / ovseg-train fine-tune
    (visual weights only are fine: the text tower then comes from ``PRETRAINED``).
    """
    model_name, pretrained = parse_clip_spec(spec)
    quick = f"{model_name}-quickgelu"  # OpenAI's weights were trained with QuickGELU
    model_name_arch = quick if pretrained == "openai" and quick in open_clip.list_models() else model_name
    if random_weights:
        torch.manual_seed(0)
        return open_clip.create_model(model_name_arch, pretrained=None).eval(), "random"
    checkpoint = _read_checkpoint(Path(weights)) if weights else None
    needs_pretrained = checkpoint is None or not any(k.startswith("transformer.") for k in checkpoint)
    if needs_pretrained and not pretrained:
        raise ExportError(
            f"--clip {spec} names no pretrained weights: use MODEL:PRETRAINED (e.g. {DEFAULT_CLIP}), --clip-weights PATH or --random-weights"
        )
    if needs_pretrained:
        model = _create_pretrained(model_name_arch, model_name, pretrained)
        source = f"open_clip {model_name}:{pretrained}"
    else:
        model = open_clip.create_model(model_name_arch, pretrained=None)
        source = ""
    if checkpoint is not None:
        _load_state(model, checkpoint, weights, full=not needs_pretrained)
        source = f"{weights}" + (f" (text tower: {source})" if source else "")
    return model.float().eval(), source


def _create_pretrained(arch: str, model_name: str, pretrained: str) -> open_clip.CLIP:
    weights = pretrained if hub_reachable() else _cached_weights(arch, pretrained)
    if weights is None:
        raise _unavailable(model_name, pretrained, "the hub is unreachable and they are not cached")
    try:
        return open_clip.create_model(arch, pretrained=weights)
    except Exception as e:
        if pretrained not in open_clip.list_pretrained_tags_by_model(model_name) and not Path(pretrained).is_file():
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name))
            raise ExportError(f"unknown pretrained tag {pretrained!r} for {model_name}: choose one of {tags}") from None
        raise _unavailable(model_name, pretrained, type(e).__name__) from None


def _unavailable(model_name: str, pretrained: str, why: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"could not download CLIP weights {model_name}:{pretrained} ({why}); "
        f"pass a local checkpoint with --clip-weights PATH, or --random-weights to build a bundle whose labels are meaningless"
    )


def _cached_weights(arch: str, pretrained: str) -> str | None:
    """With the hub out of reach: the file of the tag's hub weights in the local cache (None when it is not there), so
    that open_clip loads it as a file. open_clip has no cache-only switch, and given the tag it would retry the hub
    before looking in the cache. Tags without hub weights, unknown tags and file paths are handed on unchanged."""
    hub = open_clip.get_pretrained_cfg(arch, pretrained).get("hf_hub", "")
    if not hub:
        return pretrained
    repo_id, filename = os.path.split(hub)  # open_clip's form: "org/repo/file", or "org/repo/" for its default file
    filename = filename or HF_WEIGHTS_NAME
    safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else str(Path(filename).with_suffix(".safetensors"))
    for name in dict.fromkeys((safe, filename)):  # open_clip prefers the safetensors file, as here
        path = huggingface_hub.try_to_load_from_cache(repo_id, name)
        if isinstance(path, str):
            return path
    return None


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ExportError(f"--clip-weights {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(
            f"--clip-weights {path} cannot be read as a weights-only checkpoint ({type(e).__name__}: {str(e)[:120]})"
        ) from None
    for key in ("state_dict", "model", "student"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ExportError(f"--clip-weights {path} holds no state dict")
    return _clip_keys(state)


def _clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrappers so keys read like open_clip's CLIP: PixelCLIP's ``sem_seg_head.predictor.clip_model.``, DDP's ``module.``."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for marker in ("clip_model.", "module."):
            if marker in key:
                key = key.split(marker, 1)[1]
        out[key] = value
    return out


def _load_state(model: open_clip.CLIP, state: dict[str, torch.Tensor], path, full: bool) -> None:
    own = model.state_dict()
    wanted = {k for k in own if full or k.startswith("visual.")}
    missing = sorted(wanted - state.keys())
    if missing:
        raise ExportError(
            f"--clip-weights {path} does not fit {type(model).__name__}: missing {len(missing)} keys, e.g. {missing[:3]}"
        )
    for key in wanted:
        if state[key].shape != own[key].shape:
            raise ExportError(
                f"--clip-weights {path}: {key} has shape {tuple(state[key].shape)}, the model wants {tuple(own[key].shape)}"
            )
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)


def visual_patch_size(visual: nn.Module) -> int:
    patch = visual.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def clip_patch_size(spec: str) -> int | None:
    """The patch size of ``MODEL[:PRETRAINED]``'s ViT image tower from its open_clip config, without building it (None:
    not a ViT)."""
    config = open_clip.get_model_config(parse_clip_spec(spec)[0]) or {}
    patch = config.get("vision_cfg", {}).get("patch_size")
    return int(patch) if patch else None


def _resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of the patch position embeddings (class token kept), as PixelCLIP and TAG do."""
    n = pos.shape[0] - 1
    side = int(round(n**0.5))
    if (side, side) == grid:
        return pos
    patch = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)], dim=0)


class ClipDenseVisual(nn.Module):
    """CLIP's ViT image encoder at a fixed size with two outputs: the pooled image embedding
    (``encode_image``) and dense patch embeddings from one of the training-free dense methods.

    - ``pixelclip``: the last block without q/k: v -> out_proj, plus the class token's residual, then the MLP.
    - ``gem``: TAG's path: self-self attention (q-q, k-k, v-v averaged, applied to v) added over the last 6 blocks.
    - ``maskclip``: the last block's value embeddings -> out_proj, no residual, no MLP.
    Every token goes through ``ln_post`` and ``proj``.
    """

    def __init__(self, visual: VisionTransformer, image_size: int, method: str):
        super().__init__()
        if method not in DENSE_METHODS:
            raise ExportError(f"unknown dense method {method!r}: choose one of {', '.join(DENSE_METHODS)}")
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
            raise ExportError("dense CLIP features need a ViT image tower with class-token pooling (e.g. ViT-B-16)")
        side = patch_grid(image_size, visual_patch_size(visual), "CLIP")
        self.visual = visual
        self.method = method
        self.grid = (side, side)
        self.register_buffer(
            "pos", _resize_pos_embed(visual.positional_embedding.detach(), self.grid), persistent=False
        )
        self.blocks = visual.transformer.resblocks

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        x = v.conv1(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1) + self.pos
        x = v.ln_pre(x)
        n = len(self.blocks)
        dense = None
        for i, block in enumerate(self.blocks):
            if self.method == "gem" and i >= n - GEM_DEPTH:
                dense = x if dense is None else dense
                dense = dense + block.ls_1(_self_self_attention(block, block.ln_1(x)))
            if i == n - 1 and self.method == "pixelclip":
                dense = x[:, :1] + block.ls_1(_value_path(block, block.ln_1(x)))
                dense = dense + block.ls_2(block.mlp(block.ln_2(dense)))
            if i == n - 1 and self.method == "maskclip":
                dense = _value_path(block, block.ln_1(x))
            x = _block_forward(block, x)
        pooled = v.ln_post(x[:, 0]) @ v.proj
        tokens = v.ln_post(dense[:, 1:]) @ v.proj
        return pooled, tokens


def _qkv(block: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """q, k and v of ``block``'s attention, each (B, heads, N, head_dim)."""
    qkv = F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    return [t.reshape(t.shape[0], t.shape[1], block.attn.num_heads, -1).transpose(1, 2) for t in qkv]


def _block_forward(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One residual attention block, written out so that batch and sequence length stay dynamic in ONNX."""
    q, k, v = _qkv(block, block.ln_1(x))
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits + mask
    attn = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(x.shape)
    x = x + block.ls_1(block.attn.out_proj(attn))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _value_path(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block.attn.out_proj(_qkv(block, x)[2].transpose(1, 2).reshape(x.shape))


def _self_self_attention(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GEM's self-self attention (one iteration), temperature = mean token norm * head_dim^-0.5."""
    q, k, v = _qkv(block, x)
    inv_temp = x.norm(dim=-1).mean(dim=-1).reshape(-1, 1, 1, 1) * q.shape[-1] ** -0.5
    out = 0
    # the temperature scales one N x d operand, not the N x N logits: same math, less memory traffic
    for p in (v, k, q):
        p = F.normalize(p, dim=-1)
        p = F.normalize(torch.softmax((p * inv_temp) @ p.transpose(-2, -1), dim=-1) @ p, dim=-1)
        out = out + torch.softmax((p * inv_temp) @ p.transpose(-2, -1), dim=-1) @ v
    out = (out / 3).transpose(1, 2).reshape(x.shape)
    return block.attn.out_proj(out)


class ClipTextEncoder(nn.Module):
    """CLIP's text tower: token ids (B, L <= context length) -> un-normalised text embeddings (B, D).

    The sequence may be shorter than the context length: the causal mask means positions after the
    end-of-text token never influence it.
    """

    def __init__(self, model: open_clip.CLIP):
        super().__init__()
        if getattr(model, "text_pool_type", "argmax") != "argmax" or not hasattr(model, "token_embedding"):
            raise ExportError("only CLIP text towers that pool at the end-of-text token (argmax) are supported")
        self.model = model
        n = model.positional_embedding.shape[0]
        self.register_buffer("causal_mask", torch.full((n, n), float("-inf")).triu(1), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encode_embeddings(input_ids, self.model.token_embedding(input_ids))

    def encode_embeddings(self, input_ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """From token embeddings (B, L, width) of ``input_ids``, so learnable vectors can stand in for words."""
        m = self.model
        length = input_ids.shape[1]
        x = embeddings + m.positional_embedding[:length]
        mask = self.causal_mask[:length, :length]
        for block in m.transformer.resblocks:
            x = _block_forward(block, x, mask)
        x = m.ln_final(x)[torch.arange(x.shape[0]), input_ids.argmax(dim=-1)]
        return x @ m.text_projection if not isinstance(m.text_projection, nn.Linear) else m.text_projection(x)


def tiny_clip(image_size: int = 64, patch_size: int = 16) -> open_clip.CLIP:
    """A small random CLIP of the same structure as ViT-B-16 (with the real tokenizer's vocabulary), for tests."""
    torch.manual_seed(0)
    vision = dict(image_size=image_size, layers=7, width=64, patch_size=patch_size, head_width=16)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    return open_clip.CLIP(embed_dim=48, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
