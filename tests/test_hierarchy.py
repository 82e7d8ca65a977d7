"""Hierarchical k-means (HIRL Sec. 3.1) and hierarchy snapshots."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from hirl_ray.hierarchy import (
    PrototypeHierarchy,
    fit_hierarchy,
    latest_snapshot,
    load_hierarchy,
    save_hierarchy,
)
from hirl_ray.hierarchy.kmeans import cluster_concentration

KS = [48, 12, 4]


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def planted_tree(seed: int, per_leaf: int = 40, dim: int = 16):
    """4 roots -> 12 -> 48 Gaussian leaf blobs; returns features and planted labels per level."""
    rng = np.random.default_rng(seed)
    roots = np.linalg.qr(rng.normal(size=(dim, 4)))[0].T  # orthonormal root directions
    mids = _unit(np.repeat(roots, 3, 0) + 0.4 * _unit(rng.normal(size=(12, dim))))
    leaves = _unit(np.repeat(mids, 4, 0) + 0.1 * _unit(rng.normal(size=(48, dim))))
    leaf = np.repeat(np.arange(48), per_leaf)
    x = leaves[leaf] + 0.01 * rng.normal(size=(len(leaf), dim))
    return x.astype(np.float32), [leaf, leaf // 4, leaf // 12]


@pytest.fixture(scope="module")
def planted():
    x, labels = planted_tree(0)
    # k-means++ (not the default random init) so the planted tree is recovered reliably.
    return x, labels, fit_hierarchy(x, KS, seed=0, version=3, init="kmeans++")


def test_tree_structure(planted):
    x, _, h = planted
    assert h.version == 3 and h.num_levels == 3 and h.num_clusters == tuple(KS) and h.dim == 16
    assert len(h.parents) == 2 and len(h.assignments) == 3 and len(h.densities) == 3
    for lvl, k in enumerate(KS):
        assert h.centroids[lvl].dtype == torch.float32 and h.centroids[lvl].shape == (k, 16)
        torch.testing.assert_close(h.centroids[lvl].norm(dim=1), torch.ones(k))
        a = h.assignments[lvl]
        assert a.dtype == torch.int64 and a.shape == (len(x),)
        assert 0 <= int(a.min()) and int(a.max()) < k
        d = h.densities[lvl]
        assert d.dtype == torch.float32 and d.shape == (k,) and bool((d > 0).all())
        assert abs(float(d.mean()) - 0.2) < 1e-4  # PCL rescales to mean = temperature
    for lvl, p in enumerate(h.parents):
        assert p.dtype == torch.int64 and p.shape == (KS[lvl],)
        assert 0 <= int(p.min()) and int(p.max()) < KS[lvl + 1]
        # Chained assignments == parent maps composed.
        assert torch.equal(h.assignments[lvl + 1], p[h.assignments[lvl]])
    ancestors = h.ancestors()
    assert torch.equal(ancestors[0], torch.arange(KS[0]))
    for lvl in range(3):
        assert torch.equal(ancestors[lvl][h.assignments[0]], h.assignments[lvl])


def test_assignments_are_nearest_prototypes(planted):
    x, _, h = planted
    xn = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)

    def assert_nearest(points, centroids, labels):
        # Up to rounding: faiss and torch may order near-ties differently on another CPU.
        sims = points @ centroids.T
        chosen = sims.gather(1, labels[:, None])[:, 0]
        assert bool((chosen >= sims.max(1).values - 1e-5).all())

    assert_nearest(xn, h.centroids[0], h.assignments[0])
    assert (h.assignments[0] == (xn @ h.centroids[0].T).argmax(1)).float().mean() > 0.99
    for lvl, p in enumerate(h.parents):
        assert_nearest(h.centroids[lvl], h.centroids[lvl + 1], p)
    # Level-0 concentrations use each sample's distance to its (normalised) prototype.
    sq_dist = (xn - h.centroids[0][h.assignments[0]]).pow(2).sum(1).numpy()
    expected = cluster_concentration(sq_dist, h.assignments[0].numpy(), KS[0])
    np.testing.assert_allclose(h.densities[0].numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_recovers_planted_tree(data_seed):
    x, labels = planted_tree(data_seed)
    h = fit_hierarchy(x, KS, seed=data_seed, init="kmeans++")
    for lvl in range(3):
        nmi = normalized_mutual_info_score(labels[lvl], h.assignments[lvl].numpy())
        assert nmi >= 0.95, (lvl, nmi)
    assert normalized_mutual_info_score(labels[2], h.assignments[2].numpy()) > 0.99


def test_deterministic_per_seed_and_input_type(planted):
    x, _, h = planted
    again = fit_hierarchy(torch.from_numpy(x), KS, seed=0, version=3, init="kmeans++")
    for a, b in zip(
        h.centroids + h.assignments + h.parents + h.densities,
        again.centroids + again.assignments + again.parents + again.densities,
        strict=True,
    ):
        assert torch.equal(a, b)
    official = fit_hierarchy(x, KS, seed=0, init="random")
    assert torch.equal(official.assignments[1], official.parents[0][official.assignments[0]])


def test_default_init_is_the_official_random_seeding():
    # Unstructured points: different seedings end in different local optima.
    x = np.random.default_rng(0).normal(size=(600, 8)).astype(np.float32)
    default = fit_hierarchy(x, [20, 4], seed=0, niter=5, nredo=1)
    random = fit_hierarchy(x, [20, 4], seed=0, niter=5, nredo=1, init="random")
    plus = fit_hierarchy(x, [20, 4], seed=0, niter=5, nredo=1, init="kmeans++")
    assert all(torch.equal(a, b) for a, b in zip(default.centroids, random.centroids, strict=True))
    assert not torch.equal(default.centroids[0], plus.centroids[0])
    with pytest.raises(ValueError, match="init"):
        fit_hierarchy(x, [20, 4], init="afk-mc2")


def test_fp16_features(planted):
    x, labels, _ = planted
    h = fit_hierarchy(x.astype(np.float16), KS, seed=0, init="kmeans++")
    assert all(c.dtype == torch.float32 for c in h.centroids)
    for lvl in range(3):
        assert normalized_mutual_info_score(labels[lvl], h.assignments[lvl].numpy()) >= 0.95


@pytest.mark.parametrize(
    ("ks", "match"),
    [
        ([], "hirl.num_clusters is empty"),
        ([10, 10], r"hirl.num_clusters must strictly decrease.*level 1"),
        ([5, 10, 2], r"hirl.num_clusters must strictly decrease.*level 1"),
        ([0], r"hirl.num_clusters\[0\] must be a positive integer"),
        ([101, 5], r"hirl.num_clusters\[0\]=101 .*100 training samples at level 0"),
    ],
)
def test_rejects_bad_num_clusters(ks, match):
    x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        fit_hierarchy(x, ks)


def test_rejects_bad_features():
    x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="2-D"):
        fit_hierarchy(x[:, 0], [4])
    x[7, 3] = np.nan
    with pytest.raises(ValueError, match="1 rows with NaN"):
        fit_hierarchy(x, [4])


def test_logs_faiss_subsampling(caplog):
    x = np.random.default_rng(0).normal(size=(2000, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="hirl_ray.hierarchy.kmeans"):
        h = fit_hierarchy(x, [10, 3], max_points_per_centroid=50)
    assert "random 500 of 2000 points" in caplog.text
    assert h.assignments[0].shape == (2000,)  # every sample still gets a cluster


def test_empty_clusters_warn_but_do_not_crash(caplog):
    # 40 samples but only 3 distinct points: 6 clusters cannot all be populated.
    base = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    x = np.repeat(base, [20, 15, 5], axis=0)
    with caplog.at_level(logging.WARNING, logger="hirl_ray.hierarchy.kmeans"):
        h = fit_hierarchy(x, [6, 2])
    assert "clusters have no samples" in caplog.text
    assert all(bool(torch.isfinite(d).all()) for d in h.densities)
    assert len(h.assignments[0].unique()) == 3


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="faiss has a GPU here")
def test_use_gpu_falls_back_to_cpu(caplog):
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="hirl_ray.hierarchy.kmeans"):
        h = fit_hierarchy(x, [5], use_gpu=True)
    assert "clustering on CPU" in caplog.text and h.num_clusters == (5,)


def test_concentration_matches_pcl_loop():
    rng = np.random.default_rng(0)
    k = 12
    labels = rng.integers(0, 9, size=300)  # clusters 9..11 empty
    labels[:1] = 9  # ... and cluster 9 a singleton
    sq_dist = rng.uniform(0, 2, size=300).astype(np.float32)
    # PCL run_kmeans, literally (per-cluster Python lists).
    members = [[] for _ in range(k)]
    for i, c in enumerate(labels):
        members[c].append(sq_dist[i])
    expected = np.zeros(k)
    for c, dist in enumerate(members):
        if len(dist) > 1:
            expected[c] = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + 10)
    dmax = expected.max()
    for c, dist in enumerate(members):
        if len(dist) <= 1:
            expected[c] = dmax
    expected = expected.clip(np.percentile(expected, 10), np.percentile(expected, 90))
    expected = 0.2 * expected / expected.mean()
    np.testing.assert_allclose(cluster_concentration(sq_dist, labels, k), expected, rtol=1e-5)
    # Degenerate: every member on its centroid -> uniform temperature, not NaN.
    np.testing.assert_allclose(cluster_concentration(np.zeros(10), np.arange(10) % 2, 2), 0.2)


def test_to_and_with_version(planted):
    _, _, h = planted
    moved = h.to("cpu").with_version(9)
    assert moved.version == 9 and h.version == 3
    assert torch.equal(moved.centroids[0], h.centroids[0])
    with pytest.raises(ValueError, match="levels disagree"):
        PrototypeHierarchy(
            version=0,
            centroids=h.centroids,
            parents=h.parents[:1],
            assignments=h.assignments,
            densities=h.densities,
        )


def test_snapshot_round_trip_and_latest(planted, tmp_path):
    _, _, h = planted
    assert latest_snapshot(tmp_path / "missing") is None
    assert latest_snapshot(tmp_path) is None
    for version in (1, 12, 3):
        path = save_hierarchy(h.with_version(version), tmp_path)
        assert Path(path) == tmp_path / f"hierarchy_v{version:06d}.pt" and Path(path).is_file()
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write cleaned up after itself
    # A crashed save leaves a temp file with a higher version; it must be ignored.
    (tmp_path / "hierarchy_v000099.pt.1234.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    assert Path(latest_snapshot(tmp_path)) == tmp_path / "hierarchy_v000012.pt"

    loaded = load_hierarchy(latest_snapshot(tmp_path))
    assert isinstance(loaded, PrototypeHierarchy) and loaded.version == 12
    for name in ("centroids", "parents", "assignments", "densities"):
        for a, b in zip(getattr(loaded, name), getattr(h, name), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)

    broken = tmp_path / "hierarchy_v000013.pt"
    broken.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="hierarchy_v000013.pt: not a valid hierarchy snapshot"):
        load_hierarchy(broken)
    os.remove(broken)
