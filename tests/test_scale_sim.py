"""64 simulated ranks against the real prototype actor: rounds, concurrency, faults.

Ranks are threads in two Ray actor processes, each with the real ``HierarchyClient``; the
all-reduce is a coordinator actor (see ``tests/scale_sim.py``). CPU only, a few seconds each.
"""

from __future__ import annotations

import time

import pytest
import ray.cloudpickle

from hirl_ray.hierarchy.actor import ActorSettings, start_actor

from . import scale_sim
from .scale_sim import SimSpec, run_group, start_group

# Ray workers need not import the tests package: ship the harness by value.
ray.cloudpickle.register_pickle_by_value(scale_sim)

WORLD = 64
SAMPLES_PER_RANK = 64


def _actor(tmp_path, name: str, **kwargs):
    settings = ActorSettings(snapshot_dir=str(tmp_path / "hierarchy"), num_clusters=(32, 8),
                             num_samples=WORLD * SAMPLES_PER_RANK, seed=0, niter=10, nredo=1,
                             **kwargs)
    return start_actor(f"sim-{name}-{time.time_ns()}", settings)


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
def test_64_ranks_three_rounds_switch_together_and_put_once(ray_session, tmp_path, sync):
    actor = _actor(tmp_path, "rounds")
    spec = SimSpec(world=WORLD, attempt=1, epochs=4, steps_per_epoch=30,
                   rebuild_epochs=(1, 2, 3), sync=sync, samples_per_rank=SAMPLES_PER_RANK)
    start = time.perf_counter()
    results = run_group(spec, actor)
    elapsed = time.perf_counter() - start
    steps = _assert_lockstep(results)
    status = ray_session.get(actor.status.remote(), timeout=30)
    print(f"\n64 ranks, 3 rounds, {'sync' if sync else 'async'}: {elapsed:.1f}s, {status}")
    assert status["error"] is None and status["collecting"] == {}
    # Every rank switched to the same versions, ending on the newest one.
    assert results[0].final_version == status["version"] == max(results[0].switches)
    if sync:
        # Sync: each round is built before the next epoch, so epoch e trains with v(e).
        assert status["builds"] == 3 and results[0].switches == [1, 2, 3]
        assert _switch_steps(steps) == [(30, 1), (60, 2), (90, 3)]
    else:
        # Async: a round may be superseded by the next one if k-means is slower than an
        # epoch; at least two versions reach the ranks mid-training.
        assert status["builds"] >= 2 and len(results[0].switches) >= 2
    # Put into the object store once per version, though 64 ranks fetched each.
    assert status["puts"] == status["builds"]
