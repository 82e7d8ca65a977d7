"""Degenerate clustering inputs: a warning and a usable tree, never a crash or NaN prototypes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hirl_ray.hierarchy import PrototypeHierarchy, fit_hierarchy

KS = [10, 4, 2]


def _fit(x: np.ndarray, caplog, ks=KS) -> PrototypeHierarchy:
    with caplog.at_level(logging.WARNING, logger="hirl_ray.hierarchy.kmeans"):
        return fit_hierarchy(x, ks, seed=0, niter=10, nredo=1)


def _assert_usable(h: PrototypeHierarchy, ks=KS) -> None:
    assert h.num_clusters == tuple(ks)
    for level in range(h.num_levels):
        assert torch.isfinite(h.centroids[level]).all()
        assert torch.isfinite(h.densities[level]).all() and (h.densities[level] > 0).all()
        assert h.assignments[level].min() >= 0 and h.assignments[level].max() < ks[level]
    for level, parent in enumerate(h.parents):  # the levels still chain
        assert torch.equal(h.assignments[level + 1], parent[h.assignments[level]])


def _distinct(x: np.ndarray) -> int:
    return len(np.unique(x, axis=0))


def test_all_samples_identical_collapse_to_one_cluster_with_a_warning(caplog):
    h = _fit(np.ones((200, 8), np.float32), caplog)
    _assert_usable(h)
    assert len(h.assignments[0].unique()) == 1
    assert "9 of 10 clusters have no samples" in caplog.text
    assert "all collapsed into one cluster" in caplog.text
    assert "only about 1 distinct points" in caplog.text
    # Every centroid, used or not, is a unit vector (no NaN, no zero row).
    norms = torch.linalg.vector_norm(h.centroids[0], dim=1)
    torch.testing.assert_close(norms, torch.ones(10), atol=1e-5, rtol=0)


def test_empty_clusters_are_reseeded_from_the_farthest_points(caplog):
    # One dense blob of 195 copies plus 5 scattered points: faiss leaves clusters empty and the
    # 5 singletons share clusters; re-seeding gives every distinct point its own cluster.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    x[:195] = x[0]
    h = _fit(x, caplog)
    _assert_usable(h)
    assert _distinct(x) == 6
    assert len(h.assignments[0].unique()) == 6  # faiss alone: 3
    assert "re-seeds of empty clusters" in caplog.text
    assert "4 of 10 clusters have no samples" in caplog.text


@pytest.mark.parametrize("distinct", [3, 7])
def test_fewer_distinct_points_than_clusters(caplog, distinct):
    base = np.random.default_rng(distinct).normal(size=(distinct, 8)).astype(np.float32)
    x = np.repeat(base, 30, axis=0)
    h = _fit(x, caplog)
    _assert_usable(h)
    assert len(h.assignments[0].unique()) == distinct  # one cluster per distinct point
    assert f"{10 - distinct} of 10 clusters have no samples" in caplog.text


def test_all_zero_features_warn_and_stay_finite(caplog):
    h = _fit(np.zeros((100, 8), np.float32), caplog)
    _assert_usable(h)
    assert "100 of 100 feature rows are all-zero" in caplog.text


def test_well_separated_data_is_untouched(caplog):
    # The fallback only acts on degenerate input: planted clusters give no warning at all.
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(16, 10)))[0].T
    x = np.repeat(centres, 30, axis=0) + 0.01 * rng.normal(size=(300, 16))
    h = _fit(x.astype(np.float32), caplog, ks=[10, 3])
    _assert_usable(h, [10, 3])
    assert len(h.assignments[0].unique()) == 10
    assert "re-seeds" not in caplog.text and "have no samples" not in caplog.text
