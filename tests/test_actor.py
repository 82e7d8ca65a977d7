"""The prototype actor: rebuild from object-ref shards, snapshots, restart."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from hirl_ray.hierarchy.actor import ActorSettings, start_actor
from hirl_ray.hierarchy.snapshot import latest_snapshot


def _blobs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, 16)) * 5
    return (centers[np.arange(n) % 8] + rng.normal(size=(n, 16))).astype(np.float32)


def _submit(ray, actor, round_id, feats, world=2):
    n = len(feats)
    # DistributedSampler-style shards, padded: rank 1 repeats index 0 (dedup by index).
    shards = [np.arange(0, n, 2), np.append(np.arange(1, n, 2), 0)]
    for rank, idx in enumerate(shards[:world]):
        refs = [ray.put(idx), ray.put(feats[idx].astype(np.float16))]
        actor.submit_features.remote(round_id, rank, world, refs)


@pytest.mark.usefixtures("ray_session")
def test_actor_builds_versions_persists_and_restores(ray_session, tmp_path):
    ray = ray_session
    settings = ActorSettings(snapshot_dir=str(tmp_path), num_clusters=(16, 8, 2),
                             num_samples=400, seed=0, niter=10, nredo=1)
    actor = start_actor(f"test-actor-{time.time_ns()}", settings)
    assert ray.get(actor.latest_version.remote()) == 0
    feats = _blobs(400)
    _submit(ray, actor, 2, feats)
    h1 = ray.get(actor.wait_for_version.remote(1, 60))
    assert h1.version == 1 and h1.num_clusters == (16, 8, 2)
    assert all(a.shape == (400,) and int(a.min()) >= 0 for a in h1.assignments)
    # Samples of one planted blob share a level-2 prototype in most cases.
    top = h1.assignments[2].numpy()
    agree = np.mean([np.bincount(top[np.arange(400) % 8 == b]).max() / 50 for b in range(8)])
    assert agree > 0.9
    _submit(ray, actor, 4, feats)
    h2 = ray.get(actor.wait_for_version.remote(2, 60))
    assert h2.version == 2
    snap = latest_snapshot(tmp_path)
    assert snap is not None and snap.endswith("hierarchy_v000002.pt")

    # Kill the actor process; Ray restarts it and __init__ reloads the newest snapshot.
    ray.kill(actor, no_restart=False)
    deadline = time.time() + 60
    version = None
    while time.time() < deadline:
        try:
            version = ray.get(actor.latest_version.remote(), timeout=10)
            break
        except Exception:  # restarting
            time.sleep(0.5)
    assert version == 2
    restored = ray.get(actor.get.remote())
    for a, b in zip(restored.centroids, h2.centroids, strict=True):
        assert torch.allclose(a, b)
    old = ray.get(actor.get.remote(1))
    assert old.version == 1
    ray.kill(actor, no_restart=True)


@pytest.mark.usefixtures("ray_session")
def test_actor_answers_while_rebuilding_and_waits_for_all_ranks(ray_session, tmp_path):
    ray = ray_session
    settings = ActorSettings(snapshot_dir=str(tmp_path), num_clusters=(64, 8),
                             num_samples=20000, seed=0, niter=20, nredo=3)
    actor = start_actor(f"test-actor-busy-{time.time_ns()}", settings)
    feats = _blobs(20000, seed=1)
    # Only one of two ranks submitted: no build starts.
    idx = np.arange(0, 20000, 2)
    actor.submit_features.remote(7, 0, 2, [ray.put(idx), ray.put(feats[idx])])
    assert ray.get(actor.wait_for_version.remote(1, 1.0)) is None
    idx1 = np.arange(1, 20000, 2)
    actor.submit_features.remote(7, 1, 2, [ray.put(idx1), ray.put(feats[idx1])])
    pending = actor.wait_for_version.remote(1)
    # While k-means runs in the actor's thread, queries answer at once.
    t0 = time.perf_counter()
    status = ray.get(actor.status.remote())
    assert time.perf_counter() - t0 < 2.0
    assert status["version"] in (0, 1)
    h = ray.get(pending, timeout=120)
    assert h.version == 1 and h.assignments[0].shape == (20000,)
    ray.kill(actor, no_restart=True)
