"""PixelCLIP's objective: masks pooled over the teacher's dense features, clustered onto the class prompts by
Sinkhorn (hard assignment), masks of one cluster merged into its target, BCE of the student's mask logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, iters: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp on (N samples, K clusters) logits, summed over all ranks when distributed:
    soft assignments (N, K) whose rows sum to 1 and whose cluster totals approach N_total / K.

    float64, so a softmax of logits scaled by 100 never underflows to an all-zero cluster."""
    q = torch.softmax(logits.double(), dim=1).T  # (K, N)
    k = q.shape[0]
    total = _all_sum(q.sum().reshape(1))  # N over all ranks: each softmax row sums to 1
    if total.item() == 0:
        return q.T.float()
    q = q / total
    for _ in range(iters):
        q = q / _all_sum(q.sum(dim=1, keepdim=True)) / k  # every cluster holds 1/K of the mass
        q = q / q.sum(dim=0, keepdim=True) / total  # every sample holds 1/N
    return (q * total).T.float()


def upsample_matrix(src: int, dst: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(dst, src) weights of 1-D linear upsampling with half-pixel centres (F.interpolate, align_corners=False);
    2-D bilinear upsampling is this along each axis."""
    eye = torch.eye(src, device=device, dtype=dtype)[None]
    return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0].T


def pool_masks(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean of the bilinearly upsampled features (D, h, w) inside each mask (n, M, M): (n, D).

    Upsampling is linear, so the masks are pulled down to the grid by its adjoint instead of pushing the
    features up to M x M (the design note's fused pooling)."""
    d, h, w = features.shape
    m = masks.shape[-1]
    uy = upsample_matrix(h, m, features.device)
    ux = uy if w == h else upsample_matrix(w, m, features.device)
    masks = masks.float()
    weights = torch.einsum("yi,nyx,xj->nij", uy, masks, ux).reshape(masks.shape[0], h * w)
    area = masks.sum(dim=(1, 2)).clamp_min(1)[:, None]
    return (weights @ features.float().reshape(d, h * w).T) / area


@dataclass
class Targets:
    targets: torch.Tensor  # (B, K, M, M) float: union of the masks assigned to each cluster
    assignment: torch.Tensor  # (N,) cluster of every mask of the batch, images in order
    clusters_used: int  # distinct clusters this rank's masks went to


@torch.no_grad()
def cluster_targets(
    masks: list[torch.Tensor], teacher: torch.Tensor, prompts: torch.Tensor, scale: float = 100.0, iters: int = 3
) -> Targets:
    """masks: per image (n_i, M, M); teacher: dense features (B, D, h, w); prompts: text embeddings (K, D)."""
    k = prompts.shape[0]
    m = masks[0].shape[-1]
    pooled = pooled_masks(masks, teacher)
    logits = scale * F.normalize(pooled, dim=-1) @ F.normalize(prompts.float(), dim=-1).T
    assignment = sinkhorn(logits, iters).argmax(dim=1)
    targets = torch.zeros(len(masks), k, m, m, device=teacher.device)
    start = 0
    for b, mk in enumerate(masks):
        targets[b].index_add_(0, assignment[start : start + len(mk)], mk.float())
        start += len(mk)
    return Targets(targets.clamp_(max=1), assignment, int(assignment.unique().numel()))


def pooled_masks(masks: list[torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Every mask of the batch pooled over its image's dense features (B, D, h, w): (N, D), images in order."""
    pooled = [pool_masks(f, mk) for f, mk in zip(features, masks)]
    return torch.cat(pooled) if pooled else features.new_zeros(0, features.shape[1])


@torch.no_grad()
def own_targets(masks: list[torch.Tensor]) -> Targets:
    """Without clustering: every mask of the batch is a class of its own, (B, N, M, M) with image b's masks at their
    batch indices (the other images' masks are its negatives)."""
    n, m = sum(len(mk) for mk in masks), masks[0].shape[-1]
    targets = torch.zeros(len(masks), n, m, m, device=masks[0].device)
    start = 0
    for b, mk in enumerate(masks):
        targets[b, start : start + len(mk)] = mk.float()
        start += len(mk)
    return Targets(targets, torch.arange(n, device=targets.device), n)


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over all K clusters at the pixels some mask covers (PixelCLIP's valid pixels)."""
    valid = targets.sum(dim=1) > 0  # (B, M, M)
    if not valid.any():
        return logits.sum() * 0  # keeps every parameter in the graph, so DDP's reduction still runs

    def pick(t):
        return t.permute(0, 2, 3, 1)[valid]

    return F.binary_cross_entropy_with_logits(pick(logits).float(), pick(targets))
