"""The export side: CLIP dense methods against literal references, tokenizer, text encoder, bundle writing and errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovseg.export import clip as clip_mod
from ovseg.export import dinov2 as dino
from ovseg.export.bundle import ExportConfig, export_bundle
from ovseg.export.cli import main as export_main
from ovseg.export.clip import DENSE_METHODS, ClipDenseVisual, ClipTextEncoder, load_clip, tiny_clip
from ovseg.export.onnx_io import ExportError, run_onnx
from ovseg.export.tokenizer import build_clip_tokenizer
from ovseg.runtime.bundle.manifest import BundleError, read_manifest
from ovseg.runtime.pipeline.text import ClipTokenizer
from ovseg.runtime.pipeline.vocabulary import load_vocabulary


@pytest.fixture(scope="module")
def model():
    return tiny_clip()


def literal_tokens(visual, image):
    """The open_clip ViT, run block by block through its own modules (nn.MultiheadAttention, sequence-first)."""
    x = visual.conv1(image).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], 1)
    return visual.ln_pre(x + clip_mod._resize_pos_embed(visual.positional_embedding, (image.shape[2] // 16,) * 2))


def pixelclip_reference(visual, image):
    """PixelCLIP's forward_dense, written from its description: q, k, v all through out_proj; keep v;
    add the class token of the block input; then the MLP residual."""
    x = literal_tokens(visual, image)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    y = F.linear(last.ln_1(x), last.attn.in_proj_weight, last.attn.in_proj_bias)
    v = F.linear(y.chunk(3, dim=-1)[2], last.attn.out_proj.weight, last.attn.out_proj.bias) + x[:, :1]
    v = v + last.mlp(last.ln_2(v))
    return visual.ln_post(v[:, 1:]) @ visual.proj


def gem_reference(visual, image, depth=6, iters=1):
    """GEM as TAG runs it: parallel self-self attention path over the last ``depth`` blocks."""
    x = literal_tokens(visual, image)
    blocks = visual.transformer.resblocks
    gem = None
    for i, block in enumerate(blocks):
        if i >= len(blocks) - depth:
            gem = x if gem is None else gem
            h = block.ln_1(x)
            B, N, C = h.shape
            heads = block.attn.num_heads
            qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).reshape(B, N, 3, heads, C // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            temp = h.norm(dim=-1).mean(dim=-1).reshape(B, 1, 1, 1) * (C // heads) ** -0.5
            outs = []
            for s in (v, k, q):
                for _ in range(iters):
                    s = F.normalize(s, dim=-1)
                    s = torch.softmax(s @ s.transpose(-1, -2) * temp, -1) @ s
                s = F.normalize(s, dim=-1)
                outs.append(torch.softmax(s @ s.transpose(-1, -2) * temp, -1) @ v)
            out = (sum(outs) / 3).transpose(1, 2).reshape(B, N, C)
            gem = gem + block.attn.out_proj(out)
        x = block(x)
    return visual.ln_post(gem[:, 1:]) @ visual.proj


def maskclip_reference(visual, image):
    x = literal_tokens(visual, image)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    last = visual.transformer.resblocks[-1]
    v = F.linear(last.ln_1(x), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, -1)[2]
    return visual.ln_post(last.attn.out_proj(v)[:, 1:]) @ visual.proj


REFERENCES = {"pixelclip": pixelclip_reference, "gem": gem_reference, "maskclip": maskclip_reference}


@pytest.mark.parametrize("method", DENSE_METHODS)
def test_dense_methods_match_literal_references(model, method):
    image = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pooled, dense = ClipDenseVisual(model.visual, 96, method)(image)
        want = REFERENCES[method](model.visual, image)
        native = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
        pooled_native, _ = ClipDenseVisual(model.visual, 64, method)(native)
        encode_image = model.encode_image(native)
    assert dense.shape == (2, 36, model.visual.output_dim)
    assert F.cosine_similarity(dense, want, dim=-1).min() > 0.99999
    assert F.cosine_similarity(pooled_native, encode_image, dim=-1).min() > 0.9999


def test_dense_methods_differ(model):
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = [ClipDenseVisual(model.visual, 64, m)(image)[1] for m in DENSE_METHODS]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert F.cosine_similarity(outs[a], outs[b], dim=-1).mean() < 0.999


def test_image_size_must_be_a_multiple_of_the_patch(model):
    with pytest.raises(ExportError, match="multiple of CLIP's patch size 16"):
        ClipDenseVisual(model.visual, 100, "gem")
    with pytest.raises(ExportError, match="unknown dense method"):
        ClipDenseVisual(model.visual, 64, "dino")


def test_tokenizer_json_matches_open_clip():
    names = load_vocabulary("concepts")[::37] + ["a photo of a wet floor.", "Forklift!!", "it's  café", "x" * 400, ""]
    ours = ClipTokenizer(build_clip_tokenizer())(names)
    theirs = open_clip.tokenize(names).numpy()
    assert ours.shape[1] <= 77
    assert np.array_equal(ours, theirs[:, : ours.shape[1]])
    assert not theirs[:, ours.shape[1] :].any()


def test_text_encoder_on_trimmed_tokens_equals_full_context(model):
    ids = open_clip.tokenize(
        ["a photo of a pallet.", "person", "a very long description of a red forklift in a warehouse"]
    )
    length = int((ids > 0).sum(1).max())
    with torch.no_grad():
        full = model.encode_text(ids)
        trimmed = ClipTextEncoder(model)(ids[:, :length])
    assert F.cosine_similarity(full, trimmed).min() > 0.99999


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bundle"
    cfg = ExportConfig(out=out, image_size=112, vocab="voc21", fp16=True)
    export_bundle(cfg, clip_model=tiny_clip(), dinov2_model=dino.random_dinov2(dino.tiny_dinov2_config()))
    return out


def test_bundle_contents_and_manifest(bundle):
    manifest = read_manifest(bundle)
    assert manifest.clip.files == {"fp32": "clip_visual.onnx", "fp16": "clip_visual.fp16.onnx"}
    assert manifest.dinov2.grid == (8, 8) and manifest.clip.grid == (7, 7)
    assert (manifest.dinov2.patch_size, manifest.dinov2.embed_dim) == (14, 32)
    assert tuple(manifest.dinov2.mean) == (0.485, 0.456, 0.406) and tuple(manifest.dinov2.std) == (0.229, 0.224, 0.225)
    assert manifest.vocabulary.size == 21 and manifest.dense_method == "gem"
    for name, check in manifest.checks.items():
        floor = 0.99 if ".fp16." in name else 0.9999
        assert all(v >= floor for k, v in check.items() if "cosine" in k or "vs_encode" in k), name
    emb = np.load(bundle / "text_embeddings.fp32.npy", allow_pickle=False)
    assert emb.shape == (21, 48) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert set(manifest.sha256) >= {
        "clip_visual.onnx",
        "dinov2.onnx",
        "clip_text.onnx",
        "tokenizer.json",
        "vocabulary.hnsw",
    }


def test_bundle_text_encoder_reproduces_the_stored_embeddings(bundle):
    """The runtime path (tokenizers JSON + ONNX text encoder) gives the embeddings the export stored."""
    manifest = read_manifest(bundle)
    tokenizer = ClipTokenizer.from_file(bundle / "tokenizer.json")
    names = (bundle / "vocabulary.txt").read_text().split("\n")[:3]
    prompts = [t.replace("{}", n) for n in names for t in manifest.text.templates]
    (emb,) = run_onnx(bundle / "clip_text.onnx", {"input_ids": tokenizer(prompts)})
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb.reshape(3, len(manifest.text.templates), -1).mean(1)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    stored = np.load(bundle / "text_embeddings.fp32.npy", allow_pickle=False)[:3]
    assert np.abs(emb - stored).max() < 1e-4


def test_hnsw_index_finds_each_name(bundle):
    import hnswlib

    emb = np.load(bundle / "text_embeddings.fp32.npy", allow_pickle=False)
    index = hnswlib.Index(space="cosine", dim=emb.shape[1])
    index.load_index(str(bundle / "vocabulary.hnsw"))
    labels, _ = index.knn_query(emb, k=1)
    assert (labels[:, 0] == np.arange(len(emb))).mean() == 1.0


def test_tampered_bundle_file_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "vocabulary.txt", "a") as f:
        f.write("extra\n")
    with pytest.raises(BundleError, match="sha256"):
        read_manifest(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 99"):
        read_manifest(copy)


def test_existing_bundle_needs_force_and_failed_export_keeps_it(bundle, monkeypatch):
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="--force"):
        export_bundle(ExportConfig(out=bundle, image_size=112, vocab="voc21"), clip_model=tiny_clip())

    def explode(*args, **kwargs):
        raise ExportError("simulated failure half-way")

    monkeypatch.setattr("ovseg.export.bundle._write_vocabulary", explode)
    with pytest.raises(ExportError, match="half-way"):
        export_bundle(
            ExportConfig(out=bundle, image_size=112, vocab="voc21", force=True),
            clip_model=tiny_clip(),
            dinov2_model=dino.random_dinov2(dino.tiny_dinov2_config()),
        )
    assert (bundle / "manifest.json").read_bytes() == before
    assert not [p for p in bundle.parent.iterdir() if ".tmp-" in p.name]


def test_a_vit_b32_shape_exports_at_its_own_size_beside_dinov2_at_another(tmp_path):
    """--clip-size / --dinov2-size: each a multiple of its own encoder's patch only (96 is not one of 14, 56 not of
    32); CLIP /32's position table is interpolated to 3x3 from its native 2x2 and checked against torch."""
    out = tmp_path / "b32"
    cfg = ExportConfig(out=out, image_size=448, clip_size=96, dinov2_size=56, vocab="voc21")
    export_bundle(cfg, clip_model=tiny_clip(patch_size=32), dinov2_model=dino.random_dinov2(dino.tiny_dinov2_config()))
    manifest = read_manifest(out)
    assert manifest.image_sizes == {"clip": 96, "dinov2": 56}
    assert (manifest.clip.patch_size, manifest.clip.grid, manifest.dinov2.grid) == (32, (3, 3), (4, 4))
    assert manifest.checks["clip_visual.onnx"]["patch_embeddings.min_cosine"] >= 0.9999
    with pytest.raises(
        ExportError, match=r"^--clip-size 100 is not a multiple of CLIP's patch size 32: use 96 or 128$"
    ):
        export_bundle(
            ExportConfig(out=tmp_path / "no", clip_size=100, vocab="voc21"), clip_model=tiny_clip(patch_size=32)
        )
    with pytest.raises(
        ExportError, match=r"^--image-size 112 is not a multiple of CLIP's patch size 32: use 96 or 128$"
    ):
        export_bundle(
            ExportConfig(out=tmp_path / "no", image_size=112, vocab="voc21"), clip_model=tiny_clip(patch_size=32)
        )
    assert not (tmp_path / "no").exists()


def test_clip_checkpoints_load_in_every_layout(model, tmp_path):
    state = model.state_dict()
    torch.save(
        {"model": {f"sem_seg_head.predictor.clip_model.{k}": v for k, v in state.items()}}, tmp_path / "pixelclip.pth"
    )
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "open_clip.pt")
    for path in (tmp_path / "pixelclip.pth", tmp_path / "open_clip.pt"):
        state_dict = clip_mod._read_checkpoint(path)
        fresh = open_clip.CLIP(**_tiny_kwargs())
        clip_mod._load_state(fresh, state_dict, path, full=True)
        assert torch.equal(fresh.visual.proj, model.visual.proj)
    broken = {k: v for k, v in state.items() if "ln_post" not in k}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(ExportError, match="missing 2 keys"):
        clip_mod._load_state(
            open_clip.CLIP(**_tiny_kwargs()), clip_mod._read_checkpoint(tmp_path / "broken.pt"), "broken.pt", full=True
        )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="weights-only checkpoint"):
        clip_mod._read_checkpoint(tmp_path / "junk.pt")


def _tiny_kwargs():
    vision = dict(image_size=64, layers=7, width=64, patch_size=16, head_width=16)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    return dict(embed_dim=48, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def test_clip_weights_that_cannot_be_downloaded_fail_fast(monkeypatch):
    monkeypatch.setattr(clip_mod, "hub_reachable", lambda *a, **k: False)
    start = time.monotonic()
    with pytest.raises(ExportError, match="--clip-weights PATH, or --random-weights"):
        load_clip("ViT-B-16:openai")
    assert time.monotonic() - start < 20
    with pytest.raises(ExportError, match="unknown CLIP model"):
        load_clip("ViT-Q-99:openai")


def test_clip_weights_come_from_the_hub_cache_when_the_hub_is_out_of_reach(monkeypatch, tmp_path):
    """Offline, open_clip gets the cached file of the tag's weights (huggingface_hub's cache lookup reads no network);
    no global setting of huggingface_hub changes on the way."""
    import huggingface_hub

    cached = tmp_path / "open_clip_model.safetensors"
    lookups, calls = [], []
    offline = huggingface_hub.constants.HF_HUB_OFFLINE

    def lookup(repo_id, filename, **kwargs):
        lookups.append((repo_id, filename))
        return str(cached) if filename == cached.name else None

    def create_model(arch, pretrained=None, **kwargs):
        calls.append((arch, pretrained, huggingface_hub.constants.HF_HUB_OFFLINE))
        return open_clip.CLIP(**_tiny_kwargs())

    monkeypatch.setattr(clip_mod, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lookup)
    monkeypatch.setattr(open_clip, "create_model", create_model)
    _, source = load_clip("ViT-B-16:openai")
    assert lookups[0] == ("timm/vit_base_patch16_clip_224.openai", "open_clip_model.safetensors")
    assert calls == [("ViT-B-16-quickgelu", str(cached), offline)] and source == "open_clip ViT-B-16:openai"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--vocab", "no-such-preset"], "unknown vocabulary"),
        (["--image-size", "450"], "--image-size 450 is not a multiple of DINOv2's patch size 14: use 448 or 462"),
        (["--image-size", "210"], "--image-size 210 is not a multiple of CLIP's patch size 16: use 208 or 224"),
        (["--dinov2-size", "230"], "--dinov2-size 230 is not a multiple of DINOv2's patch size 14: use 224 or 238"),
        (["--clip-size", "100"], "--clip-size 100 is not a multiple of CLIP's patch size 16: use 96 or 112"),
        (["--clip-size", "8"], "--clip-size 8 is not a multiple of CLIP's patch size 16: use 16"),
        (["--clip", "ViT-Q-99"], "unknown CLIP model"),
    ],
)
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    assert export_main(["--out", str(tmp_path / "b"), "--random-weights", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ovseg-export: error:") and "\n" not in err
    assert message in err.lower() or message in err
    assert not (tmp_path / "b").exists()


def test_cli_refuses_existing_bundle_without_force(bundle, capsys):
    assert export_main(["--out", str(bundle), "--random-weights", "--vocab", "voc21"]) == 2
    assert "--force" in capsys.readouterr().err


def test_build_side_errors_are_ovseg_errors():
    """Every ovseg-* CLI prints an OvsegError as one line: the build side raises ExportError, and WeightsUnavailable (the
    demo's cue to fall back to random weights) is one."""
    from ovseg.errors import OvsegError
    from ovseg.export.errors import WeightsUnavailable

    assert issubclass(ExportError, OvsegError) and issubclass(WeightsUnavailable, ExportError)


def test_runtime_import_leaves_torch_out():
    code = (
        "import sys, ovseg.runtime, ovseg.runtime.bundle.manifest, ovseg.runtime.pipeline.text, ovseg.runtime.pipeline.vocabulary; "
        "print([m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_real_architectures_end_to_end_with_random_weights(tmp_path):
    """ViT-B/16 and DINOv2-S/14 at 448 (random weights): export, checks, and a vocabulary preset (fp16 is covered on tiny models)."""
    out = tmp_path / "real"
    assert export_main(["--out", str(out), "--random-weights", "--vocab", "voc21"]) == 0
    manifest = read_manifest(out)
    assert manifest.random_weights and manifest.clip.grid == (28, 28) and manifest.dinov2.grid == (32, 32)
    assert manifest.clip.embed_dim == 512 and manifest.dinov2.embed_dim == 384
    assert manifest.checks["clip_visual.onnx"]["patch_embeddings.min_cosine"] >= 0.9999
    assert manifest.checks["dinov2.onnx"]["tokens.min_cosine"] >= 0.9999
    image = np.random.default_rng(0).normal(size=(1, 3, 448, 448)).astype(np.float32)
    pooled, dense = run_onnx(out / "clip_visual.onnx", {"pixel_values": image})
    assert pooled.shape == (1, 512) and dense.shape == (1, 784, 512)
