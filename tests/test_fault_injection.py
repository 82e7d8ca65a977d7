"""Fault injection (issue 14): a killed worker, a NaN, a corrupted checkpoint and SIGTERM in one
run, with no saved epoch lost (``experiments/reliability/fault_injection.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hirl_ray.train.loop import StaticHierarchy, train_epoch
from hirl_ray.train.numerics import NAN_STEP_ENV, NanGuard, NonFiniteError, injected_nan_step

from .test_numerics import CPU, _batch, _moco

ROOT = Path(__file__).resolve().parents[1]


def test_the_nan_hook_poisons_exactly_the_chosen_global_step(monkeypatch):
    monkeypatch.delenv(NAN_STEP_ENV, raising=False)
    assert injected_nan_step() is None  # real runs: no hook
    monkeypatch.setenv(NAN_STEP_ENV, "12")
    assert injected_nan_step() == 12
    _, model, opt = _moco()
    guard = NanGuard(model, opt, CPU, policy="skip_step")

    def run(step: int, n: int):
        return train_epoch(model, [_batch(i) for i in range(n)], opt, epoch=1, step=step,
                           total_steps=100, base_lr=0.1, warmup_steps=0,
                           hierarchy=StaticHierarchy(None), device=CPU, guard=guard)

    stats, _ = run(8, 3)  # steps 8-10: the hook's step is not among them
    assert stats.nan_skipped == 0
    stats, _ = run(11, 3)  # steps 11-13: step 12 is poisoned and skipped
    assert stats.nan_skipped == 1 and torch.isfinite(torch.tensor(stats.loss))
    _, model, opt = _moco()
    with pytest.raises(NonFiniteError, match=r"epoch 2, step 12 \(train.on_nan=stop\)"):
        train_epoch(model, [_batch(i) for i in range(3)], opt, epoch=1, step=11,
                    total_steps=100, base_lr=0.1, warmup_steps=0,
                    hierarchy=StaticHierarchy(None), device=CPU, guard=NanGuard(model, opt, CPU))


@pytest.mark.slow
def test_a_run_through_every_fault_finishes_with_no_saved_epoch_lost(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.reliability.fault_injection",
                           "--work", str(tmp_path / "w"), "--json", str(out), "--epochs", "6",
                           "--timeout", "600"],
                          capture_output=True, text=True, timeout=2400, cwd=ROOT)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    faults = {f["fault"]: f for f in result["faults"]}
    assert not [f for f in faults.values() if "not_run" in f], result
    final = result["final"]
    assert proc.returncode == 0 and final["finished"], result
    assert final["all_epochs_saved"] and final["saved_epochs"] == [1, 2, 3, 4, 5, 6]
    assert final["files_skipped"] == result["setup"]["unreadable_files"] == 2

    kill = faults["worker_killed"]
    assert kill["went_on"] and kill["checkpoints_lost"] == 0
    assert kill["epochs_redone"] <= 1  # at most the epoch being committed as the worker died
    stop = faults["nan_stop"]
    assert stop["exit_code"] == 1 and stop["stopped_at_step"] == stop["nan_step"]
    assert stop["stopped_in_epoch"] == 3 and stop["saved_epochs"][-1] == 2
    corrupt = faults["checkpoint_corrupted"]
    assert corrupt["warned"] and corrupt["checkpoints_lost"] == 0
    assert corrupt["epochs_redone"] == 1  # the damaged epoch, and only it
    skip = faults["nan_skip_step"]
    assert skip["went_on"] and skip["steps_skipped"] == 1
    term = faults["sigterm"]
    assert term["exit_code"] == 143 and term["epochs_redone"] == 0
    assert term["checkpoints_lost"] == 0 and term["saved_epochs"][-1] >= 3
    assert result["totals"]["checkpoints_lost"] == 0
    assert result["totals"]["epochs_redone"] == kill["epochs_redone"] + 1
