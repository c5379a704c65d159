"""LabelIndex: exact and HNSW search agree, auto picks by size, the bundle's index loads."""

from __future__ import annotations

import numpy as np
import pytest

from ovseg.errors import SegmenterError
from ovseg.runtime.bundle.manifest import read_manifest
from ovseg.runtime.pipeline import lookup
from ovseg.runtime.pipeline.lookup import LabelIndex, l2_normalise


def random_unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    return l2_normalise(rng.standard_normal((n, dim)).astype(np.float32))


@pytest.fixture(scope="module")
def vocab20k() -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    return [f"name {i}" for i in range(20000)], random_unit(rng, 20000, 48)


def test_hnsw_agrees_with_exact_on_a_20k_vocabulary(vocab20k):
    names, emb = vocab20k
    rng = np.random.default_rng(1)
    # segment embeddings sit near some label's text embedding, not uniformly on the sphere
    queries = l2_normalise(
        emb[rng.integers(0, len(names), 300)] + 0.1 * rng.standard_normal((300, 48)).astype(np.float32)
    )
    exact = LabelIndex(names, emb, "exact").search(queries, 5)
    # a lighter graph than the bundle's M=32/200 keeps the build quick; recall holds all the same
    hnsw = LabelIndex(names, emb, "hnsw", hnsw_params={"M": 16, "ef_construction": 100}).search(queries, 5)
    recall = np.mean(exact.index[:, 0] == hnsw.index[:, 0])
    assert recall >= 0.99, recall
    agree = exact.index[:, 0] == hnsw.index[:, 0]
    np.testing.assert_allclose(hnsw.score[agree, 0], exact.score[agree, 0], atol=1e-5)


def test_exact_search_is_sorted_and_capped():
    rng = np.random.default_rng(2)
    emb = random_unit(rng, 7, 16)
    index = LabelIndex(list("abcdefg"), emb, "exact")
    q = random_unit(rng, 4, 16)
    matches = index.search(q, 3)
    full = q @ emb.T
    np.testing.assert_array_equal(matches.index, np.argsort(-full, axis=1)[:, :3])
    # einsum and the matrix product round differently (1.8e-8 apart on arm64): near-zero cosines need an atol
    np.testing.assert_allclose(matches.score, -np.sort(-full, axis=1)[:, :3], rtol=1e-6, atol=1e-7)
    assert index.search(q, 50).index.shape == (4, 7)
    np.testing.assert_allclose(index.score(q, matches.index[:, 1]), matches.score[:, 1], rtol=1e-6, atol=1e-7)


def test_auto_chooses_by_size(monkeypatch):
    rng = np.random.default_rng(3)
    emb = random_unit(rng, 30, 8)
    names = [str(i) for i in range(30)]
    assert LabelIndex(names, emb).method == "exact"
    monkeypatch.setattr(lookup, "EXACT_MAX", 29)
    index = LabelIndex(names, emb, ef=80)
    assert index.method == "hnsw" and index.requested == "auto" and index.hnsw.ef == 80


def test_a_search_for_more_than_ef_labels_leaves_ef_alone():
    rng = np.random.default_rng(5)
    names = [str(i) for i in range(300)]
    index = LabelIndex(names, random_unit(rng, 300, 16), "hnsw", ef=8)
    q = random_unit(rng, 4, 16)
    assert index.search(q, 20).index.shape == (4, 20) and index.hnsw.ef == 8
    exact = LabelIndex(names, index.embeddings, "exact").search(q, 3)
    np.testing.assert_array_equal(index.search(q, 3).index[:, 0], exact.index[:, 0])


def test_the_bundle_index_loads_and_agrees(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    exact = LabelIndex.from_bundle(tiny_bundle, manifest.vocabulary, "exact")
    hnsw = LabelIndex.from_bundle(tiny_bundle, manifest.vocabulary, "hnsw")
    assert exact.names == hnsw.names and len(exact) == manifest.vocabulary.size
    q = random_unit(np.random.default_rng(4), 10, exact.embeddings.shape[1])
    np.testing.assert_array_equal(exact.search(q, 3).index, hnsw.search(q, 3).index)


@pytest.mark.parametrize("kwargs, message", [({"method": "faiss"}, "unknown lookup"), ({"names": []}, "needs names")])
def test_index_errors(kwargs, message):
    args = {"names": ["a"], "embeddings": np.ones((1, 4), np.float32), **kwargs}
    with pytest.raises(SegmenterError, match=message):
        LabelIndex(**args)
