"""What PixelCLIP trains: the student's dense CLIP features (exactly the export's ClipDenseVisual "pixelclip" path),
k learnable class prompts read by the frozen text tower, an EMA teacher, and the training-only ConvHead."""

from __future__ import annotations

import copy

import open_clip
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer, tokenize
from torch import nn

from ovseg.export.clip import ClipDenseVisual, ClipTextEncoder, _resize_pos_embed, visual_patch_size
from ovseg.export.errors import ExportError

FINETUNE = ("attention", "full")
TEMPLATE = "A photo of a {} in the scene"  # PixelCLIP's training prompt; the learnable words replace {}
PLACEHOLDER = "{}"


class DenseClip(ClipDenseVisual):
    """ClipDenseVisual for training. The export wrapper freezes its resized position table in a buffer when built;
    here the table is re-derived from the live parameter on every call (a plain attribute, not a buffer, so DDP
    never syncs it), and the position embedding gets its gradient."""

    def __init__(self, visual, image_size: int, method: str):
        super().__init__(visual, image_size, method)
        del self.pos  # the buffer goes; forward sets a plain attribute in its place

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.pos = _resize_pos_embed(self.visual.positional_embedding, self.grid)
        return super().forward(pixel_values)

    def dense(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> dense embeddings (B, D, h, w)."""
        tokens = self(pixel_values)[1]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)


def set_trainable(visual: nn.Module, finetune: str) -> list[str]:
    """PixelCLIP's "attention" subset (attention weights and the position embedding) or the "full" encoder."""
    if finetune not in FINETUNE:
        raise ExportError(f"unknown --finetune {finetune!r}: choose one of {', '.join(FINETUNE)}")
    names = []
    for name, p in visual.named_parameters():
        p.requires_grad_(finetune == "full" or ".attn." in name or name == "positional_embedding")
        if p.requires_grad:
            names.append(name)
    return names


class _TextTower(nn.Module):
    """The text half of an open_clip CLIP (the same modules, not copies), in the shape ClipTextEncoder reads."""

    text_pool_type = "argmax"

    def __init__(self, clip: open_clip.CLIP):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection


class ClassPrompts(nn.Module):
    """k class prompts, each ``words`` learnable token embeddings inside TEMPLATE, through the frozen text tower.

    Initialised, as PixelCLIP, from the embeddings of random vocabulary tokens (seeded), drawn among the tokens that
    have an embedding: a model whose unused rows are zero (the synthetic world's CLIP has 26 of 49,408) would otherwise
    start every prompt from the same zero words, and the clustering from one cluster."""

    def __init__(self, clip: open_clip.CLIP, k: int = 64, words: int = 4, seed: int = 0):
        super().__init__()
        ClipTextEncoder(clip)  # an ExportError unless the text tower pools at the end-of-text token
        (placeholder,) = SimpleTokenizer().encode(PLACEHOLDER)
        ids = tokenize([TEMPLATE.format(" ".join([PLACEHOLDER] * words))], clip.context_length)
        ids = ids[:, : int(ids.argmax()) + 1]  # up to end-of-text: the causal tower never looks further
        self.text = ClipTextEncoder(_TextTower(clip)).requires_grad_(False)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("slots", (ids[0] == placeholder).nonzero()[:, 0], persistent=False)
        with torch.no_grad():
            table = clip.token_embedding.weight[:-10]  # the last tokens are the tokenizer's special ones
            usable = table.abs().sum(dim=1).nonzero()[:, 0]
            chosen = usable[torch.randint(len(usable), (k, words), generator=torch.Generator().manual_seed(seed))]
            self.tokens = nn.Parameter(clip.token_embedding(chosen).detach().clone().float())

    def forward(self) -> torch.Tensor:
        """Un-normalised text embeddings of the k prompts: (k, D)."""
        k = self.tokens.shape[0]
        with torch.no_grad():
            x = self.text.model.token_embedding(self.ids).expand(k, -1, -1).clone()
        x = x.to(self.tokens.dtype)
        x[:, self.slots] = self.tokens
        return self.text.encode_embeddings(self.ids.expand(k, -1), x)


class ConvHead(nn.Module):
    """PixelCLIP's training-only upsampler of one cost map (1 channel): 3x3 conv, then twice a 2x transposed conv
    and a double 3x3 conv with GroupNorm, then a 3x3 conv back to 1 channel: the grid times 4."""

    def __init__(self, widths: tuple[int, int, int] = (64, 64, 32)):
        super().__init__()
        a, b, c = widths
        self.stem = nn.Conv2d(1, a, 3, padding=1)
        self.up1, self.conv1 = nn.ConvTranspose2d(a, b, 2, stride=2), _double_conv(b)
        self.up2, self.conv2 = nn.ConvTranspose2d(b, c, 2, stride=2), _double_conv(c)
        self.out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.up1(self.stem(x)))
        return self.out(self.conv2(self.up2(x)))


def _double_conv(channels: int) -> nn.Sequential:
    layers = []
    for _ in range(2):
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(channels // 16, channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class Student(nn.Module):
    """The trained module (what DDP wraps): augmented images -> per-prompt mask logits at mask_size², and the
    prompts' text embeddings. Cost map = cosine(dense feature, prompt) per patch, upsampled by the ConvHead."""

    def __init__(self, dense: DenseClip, prompts: ClassPrompts, head: ConvHead, mask_size: int):
        super().__init__()
        self.dense, self.prompts, self.head = dense, prompts, head
        self.mask_size = mask_size

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``targets``: (N, D) embeddings to score instead of the prompts' (the no-clustering ablation's masks)."""
        features = F.normalize(self.dense.dense(images), dim=1)  # (B, D, h, w)
        embeddings = self.prompts() if targets is None else targets
        cost = torch.einsum("bdhw,kd->bkhw", features, F.normalize(embeddings, dim=-1).to(features.dtype))
        b, k, h, w = cost.shape
        logits = self.head(cost.reshape(b * k, 1, h, w))
        logits = F.interpolate(logits, size=(self.mask_size, self.mask_size), mode="bilinear", align_corners=False)
        return logits.reshape(b, k, self.mask_size, self.mask_size), embeddings


def make_teacher(dense: DenseClip) -> DenseClip:
    """A frozen copy of the student's image encoder (built before the student's first forward)."""
    teacher = DenseClip(copy.deepcopy(dense.visual), dense.grid[0] * visual_patch_size(dense.visual), dense.method)
    return teacher.eval().requires_grad_(False)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """teacher <- alpha * teacher + (1 - alpha) * student for the student's trained parameters (matched by name).

    Frozen ones are equal in both and stay so; averaging them too would only add float rounding to the teacher."""
    mine = dict(teacher.named_parameters())
    for name, s in student.named_parameters():
        if s.requires_grad:
            mine[name].mul_(alpha).add_(s.detach(), alpha=1 - alpha)
