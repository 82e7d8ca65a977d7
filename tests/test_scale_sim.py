"""64 simulated ranks against the real prototype actor: rounds, concurrency, faults.

Ranks are threads in two Ray actor processes, each with the real ``HierarchyClient``; the
all-reduce is a coordinator actor (see ``tests/scale_sim.py``). CPU only, a few seconds each.
"""

from __future__ import annotations

import time

import pytest
import ray
import ray.cloudpickle

from hirl_ray.hierarchy.actor import ActorSettings, start_actor

from . import scale_sim
from .scale_sim import SimSpec, finish_group, run_group, start_group, start_hosts

# Ray workers need not import the tests package: ship the harness by value.
ray.cloudpickle.register_pickle_by_value(scale_sim)

WORLD = 64
SAMPLES_PER_RANK = 64


@pytest.fixture(scope="module")
def hosts(ray_session):
    """Two processes that run 32 simulated ranks each, shared by the tests here."""
    started = start_hosts(2)
    yield started
    for h in started:
        ray_session.kill(h)


def _actor(tmp_path, name: str, **kwargs):
    settings = ActorSettings(snapshot_dir=str(tmp_path / "hierarchy"), num_clusters=(32, 8),
                             num_samples=WORLD * SAMPLES_PER_RANK, seed=0, niter=10, nredo=1,
                             **kwargs)
    return _started(start_actor(f"sim-{name}-{time.time_ns()}", settings))


def _started(actor):
    """Wait until the actor is up (a new process imports torch and faiss; slow under load)."""
    ray.get(actor.latest_version.remote(), timeout=300)
    return actor


def _assert_lockstep(results):
    """Every rank used the same version at every step (so switched on the same step)."""
    assert len(results) == WORLD
    reference = results[0].steps
    assert reference, "no steps ran"
    for r in results[1:]:
        assert r.steps == reference, f"rank {r.rank} diverged from rank 0"
        assert r.switches == results[0].switches
    return reference


def _switch_steps(steps):
    return [(s, v) for (s, v), (_, prev) in zip(steps[1:], steps[:-1], strict=True) if v != prev]


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.usefixtures("ray_session")
def test_64_ranks_three_rounds_switch_together_and_put_once(ray_session, hosts, tmp_path, sync):
    actor = _actor(tmp_path, "rounds")
    spec = SimSpec(world=WORLD, attempt=1, epochs=4, steps_per_epoch=30,
                   rebuild_epochs=(1, 2, 3), sync=sync, samples_per_rank=SAMPLES_PER_RANK,
                   max_extra_steps=0 if sync else 100_000)
    start = time.perf_counter()
    results = run_group(spec, actor, hosts)
    elapsed = time.perf_counter() - start
    steps = _assert_lockstep(results)
    status = ray_session.get(actor.status.remote(), timeout=30)
    print(f"\n64 ranks, 3 rounds, {'sync' if sync else 'async'}: {elapsed:.1f}s, {status}")
    assert status["error"] is None and status["collecting"] == {}
    # Every rank switched to the same versions, ending on the newest one.
    assert results[0].final_version == status["version"] == max(results[0].switches)
    assert status["builds"] == 3 and results[0].switches == [1, 2, 3]
    switches = _switch_steps(steps)
    if sync:
        # Sync: each round is built before the next epoch, so epoch e trains with v(e).
        assert switches == [(30, 1), (60, 2), (90, 3)]
    else:
        # Async: training went on while k-means ran; every rank switched mid-epoch, on the
        # same step (the lockstep check above), after the round's submission.
        assert [v for _, v in switches] == [1, 2, 3] and switches[0][0] > 30
    # Put into the object store once per version, though 64 ranks fetched each.
    assert status["puts"] == status["builds"]


def _wait_for(predicate, what: str, timeout_s: float = 120.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.usefixtures("ray_session")
def test_actor_killed_mid_build_round_is_rebuilt(ray_session, hosts, tmp_path, sync):
    ray = ray_session
    # Big enough that k-means takes a while, so the kill lands mid-build.
    settings = ActorSettings(snapshot_dir=str(tmp_path / "hierarchy"), num_clusters=(128, 16),
                             num_samples=WORLD * 512, niter=20, nredo=1)
    actor = _started(start_actor(f"sim-kill-{time.time_ns()}", settings))
    spec = SimSpec(world=WORLD, attempt=1, epochs=4, steps_per_epoch=20,
                   rebuild_epochs=(1, 2, 3), sync=sync, samples_per_rank=512, dim=64,
                   max_extra_steps=0 if sync else 100_000)
    runs, coordinator = start_group(spec, actor, hosts)

    def second_build() -> bool:
        assert not ray.wait(runs, timeout=0)[0], "the group finished before the kill"
        building = ray.get(actor.status.remote(), timeout=30)["building_round"]
        return building is not None and building[1] == 2

    _wait_for(second_build, "the second build")
    ray.kill(actor, no_restart=False)  # Ray restarts it; calls in flight are retried
    results = finish_group(runs, coordinator)
    _assert_lockstep(results)
    status = ray.get(actor.status.remote(), timeout=30)
    # The restarted actor rebuilt what was lost and went on; every rank followed.
    assert status["builds"] >= 1 and status["error"] is None
    assert results[0].final_version == status["version"] >= 2
    assert results[0].switches == [1, 2, 3]
    ray.kill(actor, no_restart=True)


@pytest.mark.usefixtures("ray_session")
def test_worker_group_killed_mid_round_new_attempt_builds_its_own_round(ray_session, hosts,
                                                                       tmp_path):
    ray = ray_session
    actor = _actor(tmp_path, "group")
    half = tuple(range(WORLD // 2, WORLD))
    dead = SimSpec(world=WORLD, attempt=1, epochs=4, steps_per_epoch=10, rebuild_epochs=(1, 2, 3),
                   sync=True, park_before_round=2, park_ranks=half)
    doomed = start_hosts(2)  # this group dies: its own processes, owners of its shards
    runs, coordinator = start_group(dead, actor, doomed)
    # Half of the ranks submitted round 2, the other half is stuck: kill the whole group.
    _wait_for(lambda: ray.get(actor.status.remote(), timeout=30)["collecting"].get("1/2")
              == WORLD // 2, "half of round 2")
    for h in [*doomed, coordinator]:
        ray.kill(h)
    # The restarted group resumes from the epoch-1 checkpoint (v1) as attempt 2. Its first 32
    # shards plus the dead group's 32 (owner-dead refs) must not make a round.
    spec = SimSpec(world=WORLD, attempt=2, epochs=4, steps_per_epoch=10, rebuild_epochs=(2, 3),
                   sync=True, start_epoch=1, start_version=1)
    results = run_group(spec, actor, hosts)
    steps = _assert_lockstep(results)
    status = ray.get(actor.status.remote(), timeout=30)
    assert status["error"] is None and status["collecting"] == {}
    assert results[0].switches == [2, 3] and _switch_steps(steps) == [(20, 2), (30, 3)]
    assert ray.get(actor.version_of_round.remote(2, 2)) == 2
    ray.kill(actor, no_restart=True)


@pytest.mark.usefixtures("ray_session")
def test_resume_with_snapshots_newer_than_the_checkpoint_waits_for_its_own_round(
        ray_session, hosts, tmp_path):
    ray = ray_session
    actor = _actor(tmp_path, "resume")
    first = SimSpec(world=WORLD, attempt=1, epochs=4, steps_per_epoch=10,
                    rebuild_epochs=(1, 2, 3), sync=True)
    assert run_group(first, actor, hosts)[0].final_version == 3
    # The group restarts from the epoch-1 checkpoint (hierarchy v1) while v2 and v3 exist:
    # its round 2 is answered by its own build (v4), not at once by attempt 1's v2/v3.
    resumed = SimSpec(world=WORLD, attempt=2, epochs=4, steps_per_epoch=10,
                      rebuild_epochs=(2, 3), sync=True, start_epoch=1, start_version=1)
    results = run_group(resumed, actor, hosts)
    steps = _assert_lockstep(results)
    assert steps[0] == (10, 1)
    assert _switch_steps(steps) == [(20, 4), (30, 5)]
    status = ray.get(actor.status.remote(), timeout=30)
    assert status["error"] is None and status["version"] == 5
    ray.kill(actor, no_restart=True)
