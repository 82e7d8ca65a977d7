"""Rebuild from shards: the same hierarchy as fit_hierarchy on the de-duplicated matrix, with
one float32 (N, D) matrix in memory instead of four (ImageNet-scale memory, issue part 5)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from hirl_ray.eval.features import dedup_by_index
from hirl_ray.hierarchy import kmeans
from hirl_ray.hierarchy.kmeans import fit_hierarchy
from hirl_ray.hierarchy.rebuild import build_from_shards, compact_present, scatter_shards

KW = {"seed": 3, "niter": 4, "nredo": 1, "use_gpu": False, "version": 7}


def clustered(n: int, dim: int, centres: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    return c[rng.integers(centres, size=n)] + 0.3 * rng.standard_normal((n, dim)).astype(
        np.float32
    )


def sampler_shards(x: np.ndarray, world: int, drop: set[int] = frozenset()):
    """DistributedSampler-style strided shards, the last padded by repeating indices, fp16."""
    n = x.shape[0]
    per_rank = -(-n // world)
    shards = []
    for rank in range(world):
        pos = np.arange(rank, per_rank * world, world)
        idx, repeat = pos % n, pos >= n  # padding repeats the first indices
        keep = ~np.isin(idx, list(drop))
        idx, repeat = idx[keep], repeat[keep]
        # Padded repeats carry a perturbed copy: the first occurrence must win, not the last.
        feats = x[idx].astype(np.float16)
        feats[repeat] += np.float16(0.5)
        shards.append((idx.astype(np.int64), feats))
    return shards


def expected(shards, n: int, ks, **kw):
    idx = torch.from_numpy(np.concatenate([s[0] for s in shards]))
    feats = torch.from_numpy(np.concatenate([s[1] for s in shards])).float()
    out, present = dedup_by_index(feats, idx, n)
    return fit_hierarchy(out[present].numpy(), ks, **kw), present.numpy()


@pytest.mark.parametrize("mppc", [1000, 40])  # 40: N > K_0 x 40, our in-place subsample runs
def test_build_from_shards_equals_fit_hierarchy_on_deduplicated_features(mppc):
    n, ks = 3000, (30, 8, 3)
    shards = sampler_shards(clustered(n, 16, 24), world=7)  # 3000 = 7 * 429 - 3: 3 repeats
    h = build_from_shards(iter(shards), n, ks, max_points_per_centroid=mppc, **KW)
    ref, present = expected(shards, n, ks, max_points_per_centroid=mppc, **KW)
    assert present.all() and h.version == 7 and h.num_samples == n
    for a, b in zip(h.assignments, ref.assignments, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(h.centroids, ref.centroids, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(h.parents, ref.parents, strict=True):
        torch.testing.assert_close(a, b)


def test_missing_samples_get_minus_one_and_the_rest_match():
    n, ks, missing = 2000, (20, 5), {0, 5, 1999, 1000, 1001}
    shards = sampler_shards(clustered(n, 8, 10, seed=1), world=3, drop=missing)
    h = build_from_shards(shards, n, ks, **KW)
    ref, present = expected(shards, n, ks, **KW)
    assert sorted(np.flatnonzero(~present)) == sorted(missing)
    for a, b in zip(h.assignments, ref.assignments, strict=True):
        assert a.shape == (n,)
        assert (a[~torch.from_numpy(present)] == -1).all()
        torch.testing.assert_close(a[torch.from_numpy(present)], b)


def test_scatter_first_occurrence_wins_and_compaction_keeps_order():
    feats = np.arange(12, dtype=np.float16).reshape(6, 2)
    idx = np.array([4, 1, 4, 0, 1, 3])  # 4 and 1 repeat; 2 and 5 never appear
    matrix, present = scatter_shards([(idx[:3], feats[:3]), (idx[3:], feats[3:])], 6)
    assert present.tolist() == [True, True, False, True, True, False]
    np.testing.assert_array_equal(matrix[[0, 1, 3, 4]], feats[[3, 1, 5, 0]].astype(np.float32))
    packed = compact_present(matrix, present)
    assert packed.base is matrix or packed is matrix  # a view: no second matrix
    np.testing.assert_array_equal(packed, feats[[3, 1, 5, 0]].astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        scatter_shards([(np.array([6]), feats[:1])], 6)
    with pytest.raises(ValueError, match="same embedding"):
        scatter_shards([(idx[:1], feats[:1]), (idx[1:2], np.zeros((1, 3), np.float16))], 6)
    with pytest.raises(ValueError, match="no shards"):
        scatter_shards([], 6)


def test_build_from_shards_holds_one_float32_matrix():
    # numpy reports its allocations to tracemalloc; faiss's own C++ buffers (labels/distances
    # per point) are not seen, the benchmark's RSS sampling covers those.
    n, dim, ks = 40_000, 128, (40, 8, 3)
    shards = sampler_shards(clustered(n, dim, 30, seed=2), world=8)
    matrix_bytes = n * dim * 4
    tracemalloc.start()
    try:
        build_from_shards(iter(shards), n, ks, max_points_per_centroid=200, **KW)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # At least the matrix itself is seen (the measurement works), and little more than it.
    assert matrix_bytes <= peak <= 1.3 * matrix_bytes, peak / matrix_bytes


def test_fit_hierarchy_overwrite_normalises_in_place_and_default_copies():
    x = clustered(500, 8, 6, seed=4)
    original = x.copy()
    h = fit_hierarchy(x, (6, 2), **KW)
    np.testing.assert_array_equal(x, original)  # default: the caller's array is untouched
    h2 = fit_hierarchy(x, (6, 2), overwrite_features=True, **KW)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(x, original / np.linalg.norm(original, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.assignments[0], h2.assignments[0])
    # Not float32 (here fp16): converted into one copy even with overwrite_features.
    half = original.astype(np.float16)
    fit_hierarchy(half, (6, 2), overwrite_features=True, **KW)
    np.testing.assert_array_equal(half, original.astype(np.float16))


def test_training_subset_is_a_uniform_prefix_and_is_undone():
    x = np.arange(50, dtype=np.float32).repeat(2).reshape(50, 2).copy()
    with kmeans._training_subset(x, 20, seed=0) as sample:
        assert sample.shape == (20, 2) and np.shares_memory(sample, x)
        rows = set(sample[:, 0].tolist())
        assert len(rows) == 20 and rows != set(range(20))  # not just the first rows
    np.testing.assert_array_equal(x, np.arange(50, dtype=np.float32).repeat(2).reshape(50, 2))
    with kmeans._training_subset(x, 50, seed=0) as sample:
        assert sample is x
