"""Resume decisions: rank 0 chooses the checkpoint and hierarchy version, every rank follows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hirl_ray.train import resume
from hirl_ray.train.checkpoint import CheckpointMeta, find_checkpoints, save_checkpoint


def _meta(epoch: int, **metrics) -> CheckpointMeta:
    return CheckpointMeta(epoch=epoch, step=10 * epoch, hierarchy_version=epoch, config={},
                          metrics=metrics)


def _write_run(run_dir, epochs=(1, 2, 3)) -> list[str]:
    for e in epochs:
        save_checkpoint(run_dir / "train" / f"epoch_{e:04d}",
                        model_state={"w": torch.full((2,), e)}, optimizer_state={},
                        scaler_state=None, meta=_meta(e))
    return find_checkpoints(run_dir)


def _rank_main(rank: int, run_dir: str, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        if rank == 1:
            # Rank 1's first two reads of the newest checkpoint fail (a transient S3 error).
            # Ranks that chose on their own would fall back to epoch 2 here.
            real, failed = resume.load_state, []

            def flaky(path, *args, **kwargs):
                if path.endswith("epoch_0003") and len(failed) < 2:
                    failed.append(path)
                    raise OSError("simulated transient storage error")
                return real(path, *args, **kwargs)

            resume.load_state = flaky
        state, plan = resume.agree_on_resume(
            rank, torch.device("cpu"), lambda: find_checkpoints(run_dir), lambda: None,
            lambda attempt, round_id: None)
        torch.save((plan, int(state["model"]["w"][0])), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rank_zero_decides_and_a_transient_read_error_on_rank_one_does_not_split_ranks(tmp_path):
    _write_run(tmp_path)
    # Results come back as files, not through mp.Manager(): a Manager forks this process, and a
    # fork of a process that holds a Ray driver (the test session's) breaks its GCS connection.
    mp.spawn(_rank_main, args=(str(tmp_path), str(tmp_path / "pg"), str(tmp_path)), nprocs=2,
             join=True)
    (plan0, weight0), (plan1, weight1) = (
        torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert plan0 == plan1  # epoch, step, version, pending round and attempt
    assert (plan0.epoch, plan0.step, plan0.version) == (3, 30, 3)
    assert plan0.checkpoint.endswith("epoch_0003") and weight0 == weight1 == 3


def test_choose_checkpoint_skips_unreadable_and_keeps_the_registered_floor(tmp_path):
    paths = _write_run(tmp_path)

    def load(path):
        if path.endswith("epoch_0003"):
            raise OSError("truncated upload")
        return resume.load_with_retries(path, tries=1)

    path, state, meta = resume.choose_checkpoint(paths, None, load)
    assert path.endswith("epoch_0002") and meta.epoch == 2 and int(state["model"]["w"][0]) == 2
    # Ray's registered checkpoint is at epoch 2: nothing newer loads, so use the registered one.
    path, state, meta = resume.choose_checkpoint(paths, _meta(2), load)
    assert (path, state, meta.epoch) == (resume.REGISTERED, None, 2)
    assert resume.choose_checkpoint([], None, load) == (None, None, None)


@pytest.mark.parametrize(("built", "expected"), [(None, (2, 5)), (4, (4, None))])
def test_plan_redoes_a_pending_round_unless_its_version_exists(built, expected):
    meta = CheckpointMeta(epoch=5, step=50, hierarchy_version=2, config={},
                          metrics={"hierarchy_building": True, "hierarchy_pending_round": 5,
                                   "hierarchy_attempt": 77})
    asked = []

    def version_of_round(attempt, round_id):
        asked.append((attempt, round_id))
        return built

    plan = resume.plan_from_meta("ckpt", meta, 99, version_of_round)
    assert asked == [(77, 5)]  # the round of the attempt that took the checkpoint
    assert (plan.version, plan.pending_round) == expected
    assert (plan.epoch, plan.step, plan.attempt) == (5, 50, 99)
    idle = CheckpointMeta(epoch=5, step=50, hierarchy_version=2, config={},
                          metrics={"hierarchy_building": False, "hierarchy_pending_round": -1})
    assert resume.plan_from_meta("ckpt", idle, 1, version_of_round).pending_round is None
