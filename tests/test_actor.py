"""The prototype actor: rebuild from object-ref shards, snapshots, restart, rounds."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from hirl_ray.hierarchy.actor import ActorSettings, Shard, start_actor
from hirl_ray.hierarchy.snapshot import latest_snapshot, read_origins


def _blobs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, 16)) * 5
    return (centers[np.arange(n) % 8] + rng.normal(size=(n, 16))).astype(np.float32)


def _shards(ray, feats, round_id, attempt=1, world=2):
    n = len(feats)
    # DistributedSampler-style shards, padded: rank 1 repeats index 0 (dedup by index).
    idx = [np.arange(0, n, 2), np.append(np.arange(1, n, 2), 0)]
    return [Shard(attempt, round_id, rank, world,
                  (ray.put(idx[rank]), ray.put(feats[idx[rank]].astype(np.float16))))
            for rank in range(world)]


def _submit(ray, actor, round_id, feats, attempt=1, timeout_s=120.0):
    """Every rank submits and waits; returns the statuses."""
    calls = [actor.wait_round.remote(attempt, round_id, s, timeout_s)
             for s in _shards(ray, feats, round_id, attempt)]
    return ray.get(calls, timeout=timeout_s + 30)


def _restarted_version(ray, actor):
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            return ray.get(actor.latest_version.remote(), timeout=10)
        except Exception:  # restarting
            time.sleep(0.5)
    return None


@pytest.mark.usefixtures("ray_session")
def test_actor_builds_versions_persists_and_restores(ray_session, tmp_path):
    ray = ray_session
    settings = ActorSettings(snapshot_dir=str(tmp_path), num_clusters=(16, 8, 2),
                             num_samples=400, seed=0, niter=10, nredo=1)
    actor = start_actor(f"test-actor-{time.time_ns()}", settings)
    assert ray.get(actor.latest_version.remote()) == 0
    feats = _blobs(400)
    statuses = _submit(ray, actor, 2, feats)
    assert [(s.state, s.version, s.round) for s in statuses] == [("ready", 1, 2)] * 2
    # Both ranks got the same object ref: the hierarchy was put once, not copied per rank.
    assert statuses[0].ref[0] == statuses[1].ref[0]
    h1 = ray.get(statuses[0].ref[0])
    assert h1.version == 1 and h1.num_clusters == (16, 8, 2)
    assert all(a.shape == (400,) and int(a.min()) >= 0 for a in h1.assignments)
    # Samples of one planted blob share a level-2 prototype in most cases.
    top = h1.assignments[2].numpy()
    agree = np.mean([np.bincount(top[np.arange(400) % 8 == b]).max() / 50 for b in range(8)])
    assert agree > 0.9
    assert _submit(ray, actor, 4, feats)[0].version == 2
    snap = latest_snapshot(tmp_path)
    assert snap is not None and snap.endswith("hierarchy_v000002.pt")
    assert {v: (o.attempt, o.round) for v, o in read_origins(tmp_path).items()} == \
        {1: (1, 2), 2: (1, 4)}
    assert ray.get(actor.status.remote())["puts"] == 2

    # Kill the actor process; Ray restarts it and __init__ reloads the newest snapshot and
    # which round built each version, so waits for old rounds still answer.
    ray.kill(actor, no_restart=False)
    assert _restarted_version(ray, actor) == 2
    restored = ray.get(actor.get.remote())
    for a, b in zip(restored.centroids, ray.get(actor.get.remote(2)).centroids, strict=True):
        assert torch.allclose(a, b)
    assert ray.get(actor.get.remote(1)).version == 1
    again = ray.get(actor.wait_round.remote(1, 4, None, 5.0))
    assert (again.state, again.version) == ("ready", 2)
    assert ray.get(actor.version_of_round.remote(1, 2)) == 1
    assert ray.get(actor.version_of_round.remote(7, 2)) is None
    # Another attempt's round 2 is not answered by attempt 1's version.
    assert ray.get(actor.wait_round.remote(7, 2, None, 0.5)).state == "pending"
    ray.kill(actor, no_restart=True)


@pytest.mark.usefixtures("ray_session")
def test_actor_answers_while_rebuilding_and_waits_for_all_ranks(ray_session, tmp_path):
    ray = ray_session
    settings = ActorSettings(snapshot_dir=str(tmp_path), num_clusters=(64, 8),
                             num_samples=20000, seed=0, niter=20, nredo=3)
    actor = start_actor(f"test-actor-busy-{time.time_ns()}", settings)
    first, second = _shards(ray, _blobs(20000, seed=1), 7)
    # Only one of two ranks submitted: no build starts, the wait is bounded.
    assert ray.get(actor.wait_round.remote(1, 7, first, 1.0)).state == "pending"
    pending = actor.wait_round.remote(1, 7, second, 120.0)
    # While k-means runs off the event loop, queries answer at once.
    t0 = time.perf_counter()
    status = ray.get(actor.status.remote())
    assert time.perf_counter() - t0 < 2.0
    assert status["version"] in (0, 1)
    done = ray.get(pending, timeout=150)
    assert done.state == "ready" and ray.get(done.ref[0]).assignments[0].shape == (20000,)
    ray.kill(actor, no_restart=True)


@pytest.mark.usefixtures("ray_session")
def test_actor_serves_more_parked_waits_than_a_thread_pool(ray_session, tmp_path):
    # The old threaded actor (16 threads) deadlocked at 17 ranks: 16 blocked waits held
    # every thread, so the 17th submit and even status() never ran.
    ray = ray_session
    world, n = 65, 65 * 8
    settings = ActorSettings(snapshot_dir=str(tmp_path), num_clusters=(8, 2), num_samples=n,
                             niter=5, nredo=1)
    actor = start_actor(f"test-actor-many-{time.time_ns()}", settings)
    feats = _blobs(n)
    shards = [Shard(1, 1, r, world, (ray.put(np.arange(r, n, world)),
                                     ray.put(feats[r::world].astype(np.float16))))
              for r in range(world)]
    ray.get(actor.latest_version.remote(), timeout=300)  # started (imports torch and faiss)
    parked = [actor.wait_round.remote(1, 1, s, 120.0) for s in shards[:-1]]
    deadline = time.time() + 60
    while ray.get(actor.status.remote(), timeout=10)["collecting"].get("1/1", 0) < world - 1:
        assert time.time() < deadline, "the actor stopped accepting calls"
    last = ray.get(actor.wait_round.remote(1, 1, shards[-1], 120.0), timeout=150)
    statuses = ray.get(parked, timeout=150)
    assert {(s.state, s.version) for s in statuses + [last]} == {("ready", 1)}
    assert ray.get(actor.status.remote())["puts"] == 1
    ray.kill(actor, no_restart=True)


@pytest.mark.usefixtures("ray_session")
def test_failed_build_settles_its_round_only_and_attempts_do_not_mix(ray_session, tmp_path):
    ray = ray_session
    settings = ActorSettings(snapshot_dir=str(tmp_path), num_clusters=(8, 2), num_samples=200,
                             niter=5, nredo=1)
    actor = start_actor(f"test-actor-fail-{time.time_ns()}", settings)
    bad = _blobs(200)
    bad[3] = np.nan  # fit_hierarchy refuses NaN features
    failed = _submit(ray, actor, 1, bad)
    assert {s.state for s in failed} == {"failed"} and "NaN" in failed[0].error
    # The error does not stick: the next round builds.
    assert {s.state for s in _submit(ray, actor, 2, _blobs(200))} == {"ready"}
    # A dead group (attempt 1) left half a round 3; a new group (attempt 2) submits its
    # round 3: only its own two shards complete it.
    old = _shards(ray, _blobs(200), 3, attempt=1)
    ray.get(actor.wait_round.remote(1, 3, old[0], 0.1))
    new = _shards(ray, _blobs(200, seed=5), 3, attempt=2)
    assert ray.get(actor.wait_round.remote(2, 3, new[0], 0.5)).state == "pending"
    assert ray.get(actor.status.remote())["collecting"] == {"1/3": 1, "2/3": 1}
    done = ray.get(actor.wait_round.remote(2, 3, new[1], 60.0), timeout=90)
    assert (done.state, done.version) == ("ready", 2)
    assert ray.get(actor.version_of_round.remote(2, 3)) == 2
    assert ray.get(actor.status.remote())["collecting"] == {}  # the dead group's half round
    ray.kill(actor, no_restart=True)


@pytest.mark.usefixtures("ray_session")
def test_a_round_completed_during_a_build_is_dropped_when_a_newer_one_completes(
        ray_session, tmp_path):
    # Async training with slow k-means: rounds 2 and 3 complete while round 1 builds; round
    # 2's features are older than round 3's, so only round 3 is built next.
    ray = ray_session
    settings = ActorSettings(snapshot_dir=str(tmp_path), num_clusters=(64, 8),
                             num_samples=20000, niter=20, nredo=3)
    actor = start_actor(f"test-actor-queue-{time.time_ns()}", settings)
    feats = _blobs(20000, seed=2)

    def shard(round_id):
        return Shard(1, round_id, 0, 1, (ray.put(np.arange(20000)),
                                         ray.put(feats.astype(np.float16))))

    first = actor.wait_round.remote(1, 1, shard(1), 120.0)
    _wait = time.time() + 120
    while ray.get(actor.status.remote(), timeout=300)["building_round"] is None:
        assert time.time() < _wait
    second = actor.wait_round.remote(1, 2, shard(2), 120.0)
    third = actor.wait_round.remote(1, 3, shard(3), 120.0)
    while (status := ray.get(actor.status.remote()))["queued"] != [[1, 2], [1, 3]]:
        assert time.time() < _wait
    assert status["building_round"] == (1, 1)
    assert (ray.get(first, timeout=150).version, ray.get(first).round) == (1, 1)
    answers = [ray.get(r, timeout=150) for r in (second, third)]
    # Round 2's waiters are answered by round 3's version.
    assert [(a.state, a.version, a.round) for a in answers] == [("ready", 2, 3)] * 2
    assert ray.get(actor.status.remote())["builds"] == 2
    ray.kill(actor, no_restart=True)
