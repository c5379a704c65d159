"""ovseg's compiled core: fused per-segment pooling, label-map rendering and
spherical k-means (C++17, threads, GIL released).

Arrays must be numpy arrays (or other CPU arrays exporting DLPack / the
buffer protocol) of exactly the stated dtype, C-contiguous and non-empty: the
functions never convert or copy their inputs, they raise instead (TypeError for
a wrong type or dtype, ValueError for a wrong shape, layout, value, or NaN/Inf
in a float input), so pass ``np.ascontiguousarray(a, dtype=...)`` when in doubt.
Bilinear upsampling everywhere uses half-pixel centres and clamped edges
(align_corners=False), i.e. cv2.resize INTER_LINEAR / torch F.interpolate
"bilinear" when upsampling.
"""

import numpy as np
import numpy.typing as npt

# Stub-only aliases (private: the module has no such attributes).
_F32 = npt.NDArray[np.float32]
_I32 = npt.NDArray[np.int32]
_U8 = npt.NDArray[np.uint8]

def upsample_argmax(scores: _F32, out_h: int, out_w: int) -> _I32:
    """Bilinearly upsample scores [K, h, w] to (out_h, out_w) and take the argmax
    over K (the lowest index wins exact ties): int32 [out_h, out_w]."""

def pool_segments_from_scores(scores: _F32, features: _F32, out_h: int, out_w: int) -> tuple[_F32, _F32, _I32]:
    """TAG's segment embeddings of the label map upsample_argmax(scores, out_h, out_w), K =
    scores.shape[0]: the mean of the features [hf, wf, D], bilinearly upsampled to (out_h, out_w),
    over each label's pixels, L2-normalised — computed through the adjoint of the upsampling, never
    materialising it. Returns (embeddings [K, D], areas [K] in pixels, exact up to 2**24, labels
    [out_h, out_w]); empty segments give a zero row and area 0."""

def spherical_kmeans(
    x: _F32,
    k: int,
    max_iter: int = 10,
    seed: int = 0,
    init: _F32 | None = None,
    tol: float = 1e-4,
) -> tuple[_F32, _I32, _F32]:
    """Spherical k-means of the L2-normalised rows of x [N, D] (x is not modified): k-means++
    seeding from `seed` (splitmix64, deterministic), or a warm start from init [k, D]
    (normalised; rows must be non-zero). Assignment by max cosine (lowest index wins ties),
    centres = normalised member sums; an empty cluster takes the point farthest from its
    centre among clusters with >= 2 members, or keeps its centre if there is none. Stops when
    the largest centre shift (L2) is < tol or after max_iter iterations (max_iter=0: seeding
    only). Returns (centres [k, D], assignment [N], scores = x_normalised @ centres.T [N, k]),
    the last two for the returned centres. k > N is allowed: the extra centres duplicate points
    and stay empty. Results do not depend on the thread count."""

def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (1..1024; default: the hardware concurrency)."""

def get_num_threads() -> int:
    """Threads used by the CPU kernels."""

def default_palette(k: int) -> _U8:
    """The PASCAL VOC colour map for k labels in BGR order: uint8 [k, 3]."""

def peak_allocated_bytes(reset: bool = True) -> int:
    """Peak bytes allocated by the native kernels (scratch and outputs), above what they held at
    the previous reset, since that reset; reset=True starts a new measurement."""
