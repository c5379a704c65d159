"""Plain numpy references for ovseg._native: literal, float64, slow on purpose.

- pooling: TAG's computation as written — upsample the features to the label
  map's size, then average inside each mask and L2-normalise;
- label maps: cv2.resize of the K score channels and argmax;
- spherical k-means: the same algorithm as the native one, vectorised.
"""

from __future__ import annotations

import cv2
import numpy as np


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: source taps (i0, i1) and the weight of i1, half-pixel
    centres (align_corners=False), clamped at the edges."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    lam = src - i0
    edge = i0 >= n_in - 1
    i0[edge] = n_in - 1
    lam[edge] = 0.0
    return i0, np.minimum(i0 + 1, n_in - 1), lam


def upsample_bilinear(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """a [h, w, ...] -> [out_h, out_w, ...] in float64: the literal upsampling."""
    a = np.asarray(a, np.float64)
    y0, y1, ly = bilinear_taps(a.shape[0], out_h)
    x0, x1, lx = bilinear_taps(a.shape[1], out_w)
    ly = ly.reshape((-1,) + (1,) * (a.ndim - 1))
    lx = lx.reshape((1, -1) + (1,) * (a.ndim - 2))
    rows = a[y0] * (1.0 - ly) + a[y1] * ly
    return rows[:, x0] * (1.0 - lx) + rows[:, x1] * lx


def pool_segments(labels: np.ndarray, features: np.ndarray, num_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """TAG: mean of the upsampled features inside each mask, L2-normalised.
    Returns float64 (embeddings [K, D], areas [K])."""
    up = upsample_bilinear(features, *labels.shape)
    emb = np.zeros((num_segments, features.shape[2]))
    areas = np.zeros(num_segments)
    for k in range(num_segments):
        mask = labels == k
        areas[k] = mask.sum()
        if areas[k]:
            mean = up[mask].mean(axis=0)
            norm = np.linalg.norm(mean)
            emb[k] = mean / norm if norm > 0 else 0.0
    return emb, areas


def resize_channels(scores: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """cv2.resize (INTER_LINEAR) of every channel of scores [K, h, w] -> [out_h, out_w, K] float32."""
    parts = []
    for c in range(0, len(scores), 128):  # cv2 takes at most 128 channels
        chunk = np.ascontiguousarray(scores[c : c + 128].transpose(1, 2, 0), np.float32)
        up = cv2.resize(chunk, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        parts.append(up.reshape(out_h, out_w, -1))
    return np.concatenate(parts, axis=2)


def voc_palette_bgr(k: int) -> np.ndarray:
    """PASCAL VOC colour map (bit-interleaved label index), BGR."""
    pal = np.zeros((k, 3), np.uint8)
    for i in range(k):
        v, r, g, b = i, 0, 0, 0
        for bit in range(7, -1, -1):
            r |= (v & 1) << bit
            g |= ((v >> 1) & 1) << bit
            b |= ((v >> 2) & 1) << bit
            v >>= 3
        pal[i] = (b, g, r)
    return pal


def upsample_argmax(scores: np.ndarray, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """cv2.resize of the K channels + argmax. Returns (labels int32, upsampled scores [out_h, out_w, K])."""
    up = resize_channels(scores, out_h, out_w)
    return up.argmax(axis=2).astype(np.int32), up


def one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    """Score maps float32 [k, H, W] whose argmax at their own size is `labels` (values in [0, k)):
    how the tests give ``pool_segments_from_scores`` an arbitrary label map."""
    return (labels == np.arange(k, dtype=labels.dtype)[:, None, None]).astype(np.float32)


def near_tie_mismatches(labels: np.ndarray, upsampled: np.ndarray, tol: float = 1e-5) -> int:
    """Pixels whose label is not an argmax of `upsampled` [H, W, K] within tol (relative):
    0 means the labels agree with the reference except on (numerically) exact ties."""
    top = upsampled.max(axis=2)
    got = np.take_along_axis(upsampled, labels[..., None].astype(np.int64), axis=2)[..., 0]
    return int((got < top - tol * (1.0 + np.abs(top))).sum())


def _normalise(a: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    return a / np.where(norm == 0, 1.0, norm)


def spherical_kmeans(x: np.ndarray, init: np.ndarray, max_iter: int = 10, tol: float = 1e-4):
    """The native algorithm from a given init, vectorised numpy in float64.
    Returns (centres [k, D], assignment [N], scores [N, k])."""
    xn = _normalise(np.asarray(x, np.float64))
    c = _normalise(np.asarray(init, np.float64))
    n, k = len(xn), len(c)
    for _ in range(max_iter):
        s = xn @ c.T
        a = s.argmax(axis=1)
        count = np.bincount(a, minlength=k)
        sums = np.zeros_like(c)
        np.add.at(sums, a, xn)
        if (count == 0).any():  # empty cluster: the farthest point of a cluster that keeps one
            order = np.argsort(s[np.arange(n), a], kind="stable")
            nxt = 0
            for j in np.flatnonzero(count == 0):
                while nxt < n and count[a[order[nxt]]] <= 1:
                    nxt += 1
                if nxt == n:
                    break
                p = order[nxt]
                nxt += 1
                count[a[p]] -= 1
                sums[a[p]] -= xn[p]
                a[p] = j
                count[j] = 1
                sums[j] = xn[p]
        new = _normalise(sums)
        keep = ~new.any(axis=1)
        new[keep] = c[keep]
        shift = np.linalg.norm(new - c, axis=1).max()
        c = new
        if shift < tol:
            break
    s = xn @ c.T
    return c, s.argmax(axis=1), s
