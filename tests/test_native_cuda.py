"""The CUDA kernels against their CPU counterparts (skipped without a CUDA GPU)."""

from __future__ import annotations

import numpy as np
import pytest
from test_native import assert_pooling_matches, block_labels, smooth_scores

from ovseg import _native as nat

import native_reference as ref

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def need_gpu():
    if not nat.cuda_available():
        try:
            nat.render_cuda(np.zeros((1, 1, 1), np.float32), 1, 1)
        except RuntimeError as e:
            reason = str(e)
            pytest.skip(reason if reason.startswith("no CUDA GPU") else f"no CUDA GPU: {reason}")


@pytest.mark.parametrize("grid,k,d", [(28, 15, 512), (32, 15, 64), (2, 64, 8), (64, 64, 16)])
def test_pool_segments_cuda_matches_cpu(grid, k, d):
    rng = np.random.default_rng(grid)
    labels = block_labels((448, 448), k + 1, 12, seed=grid) - 1
    features = rng.standard_normal((grid, grid, d)).astype(np.float32)
    emb, areas = nat.pool_segments_cuda(labels, features, k)
    # the CPU pooling of the same label map: its one-hot maps, with -1 (ignored) as an extra map k
    one_hot = ref.one_hot(np.where(labels < 0, k, labels), k + 1)
    cpu_emb, cpu_areas, _ = nat.pool_segments_from_scores(one_hot, features, 448, 448)
    np.testing.assert_array_equal(areas, cpu_areas[:k])
    np.testing.assert_allclose(emb, cpu_emb[:k], atol=1e-5)
    if d <= 64:
        assert_pooling_matches(labels, features, k, emb, areas)


@pytest.mark.parametrize("label_dtype", ["int32", "uint16", "uint8"])
@pytest.mark.parametrize("k", [1, 15, 300, 1500])  # 1500: no blend table
def test_render_cuda_matches_cpu(label_dtype, k):
    if label_dtype == "uint8" and k > 256:
        pytest.skip(f"{k} labels do not fit uint8")
    rng = np.random.default_rng(k)
    scores = smooth_scores(k, 32, 32, seed=k) if k <= 64 else rng.standard_normal((k, 8, 8)).astype(np.float32)
    frame = rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    palette = rng.integers(0, 256, (k, 3), dtype=np.uint8)
    labels, overlay = nat.render_cuda(scores, 720, 1280, frame, palette, 0.4, label_dtype)
    cpu_labels = nat.upsample_argmax(scores, 720, 1280).astype(label_dtype)
    assert labels.dtype == cpu_labels.dtype
    up = ref.resize_channels(scores, 720, 1280)
    assert ref.near_tie_mismatches(labels, up) == 0
    assert (labels != cpu_labels).mean() < 1e-4  # float rounding differs on near-ties only
    np.testing.assert_array_equal(overlay, ref.blend(frame, palette, labels, 0.4))
    labels_only, none = nat.render_cuda(scores, 720, 1280, label_dtype=label_dtype)
    assert none is None
    np.testing.assert_array_equal(labels_only, labels)
