"""SIGTERM / Ctrl-C during a fit: the current epoch's checkpoint is written, the process exits
with one line, and the same command resumes (issue 14)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hirl_ray.train.interrupt import Interrupted, StopRequest, run_epochs

from .conftest import tiny_config
from .test_secrets import ENV_SECRET, PASSWORD, files_with_secrets, planted_overrides


def _wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_signal_mid_epoch_stops_after_that_epochs_checkpoint_and_a_rerun_resumes():
    previous = signal.getsignal(signal.SIGTERM)
    saved: list[int] = []  # checkpoints, written at the end of each epoch
    told: list[int] = []

    def epoch_fn(epoch: int) -> None:
        if epoch == 2:  # mid-epoch 3 (0-based 2)
            os.kill(os.getpid(), signal.SIGTERM)
        saved.append(epoch + 1)

    with StopRequest(notify=told.append) as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        done = run_epochs(0, 6, epoch_fn, lambda: stop.requested)
    assert (done, saved, stop.signum) == (3, [1, 2, 3], signal.SIGTERM)
    assert _wait_for(lambda: told == [signal.SIGTERM])  # the workers are told once
    assert signal.getsignal(signal.SIGTERM) == previous  # handlers restored
    error = Interrupted("stopped", signal.SIGTERM, 3, "ckpt")
    assert error.exit_code == 143

    # The same command again: starts after the saved epoch and finishes.
    assert run_epochs(saved[-1], 6, epoch_fn, lambda: False) == 6
    assert saved == [1, 2, 3, 4, 5, 6]
    # A stop asked during the last epoch changes nothing: the run is complete.
    assert run_epochs(5, 6, lambda e: None, lambda: True) == 6


def test_a_second_signal_stops_at_once():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: stop.requested)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises here, long before the end


def _fit_command(tmp_path: Path) -> list[str]:
    overrides = {**tiny_config(tmp_path, **{"train.epochs": 3}), **planted_overrides(tmp_path),
                 # Retention through Ray Train: the rerun must resume after Ray deleted some.
                 "storage.keep_checkpoints": 2, "storage.keep_snapshots": 1,
                 "storage.best_metric": "loss", "storage.best_mode": "min",
                 "eval.protocols": ["knn"]}
    args = [f"{k}={v}" if not isinstance(v, list) else f"{k}=[{','.join(map(str, v))}]"
            for k, v in overrides.items()]
    return [sys.executable, "-m", "hirl_ray.cli", "fit", *args]


def _start(cmd: list[str], env: dict[str, str], cwd: Path, new_group: bool = False
           ) -> tuple[subprocess.Popen, list[str]]:
    """``new_group``: the process leads its own process group, as a shell's foreground job."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=cwd, start_new_session=new_group)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


@pytest.mark.slow
def test_sigterm_to_hirl_ray_fit_saves_the_epoch_exits_with_one_line_and_the_rerun_resumes(
        tmp_path):
    from hirl_ray.hierarchy.snapshot import snapshot_versions
    from hirl_ray.runs import LAYOUT
    from hirl_ray.train.checkpoint import find_checkpoints, is_best_copy, read_meta

    # Ray's own session folder (logs of every Ray process) goes to a short path of ours, so
    # that it is scanned for the planted secrets too (a Unix socket path must stay < 108).
    ray_tmp = Path(tempfile.mkdtemp(prefix="hr", dir="/tmp"))
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": ENV_SECRET, "HIRL_RAY_DASHBOARD": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    cmd = _fit_command(tmp_path)
    run = tmp_path / "run"

    def epochs() -> list[int]:
        return [read_meta(p).epoch for p in find_checkpoints(run) if not is_best_copy(p)]

    proc, lines = _start(cmd, env, tmp_path)
    try:
        seen = _wait_for(lambda: any(re.search(r"epoch +1/3", x) for x in lines), 400)
        assert seen, "".join(lines)[-3000:]
        proc.send_signal(signal.SIGTERM)  # to the driver only, as a scheduler would
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = "".join(lines)
    saved = epochs()
    assert rc == 128 + signal.SIGTERM, first[-3000:]
    # Our message is one whole line; Ray's background actors may still log after it.
    said = [x for x in first.splitlines() if x.startswith("hirl-ray: ")]
    assert len(said) == 1 and re.fullmatch(
        rf"hirl-ray: stopped by SIGTERM after epoch {saved[-1]}/3 \(checkpoint "
        r".*epoch_000\d\); run the same command again to resume", said[0]), first[-3000:]
    assert saved in ([1], [1, 2])  # stopped after the epoch in flight, nothing lost
    assert not (run / "metrics.json").exists()  # stopped before the final evaluation

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=600)
    second = again.stdout + again.stderr
    assert again.returncode == 0, second[-3000:]
    assert f"resumed at epoch {saved[-1]}" in second  # no saved epoch redone
    assert (run / "metrics.json").is_file()
    # Ray Train deleted all but the newest 2 epoch checkpoints, at most one best copy was
    # added, and every remaining checkpoint still finds its hierarchy snapshot.
    assert epochs() == [2, 3]
    assert sum(is_best_copy(p) for p in find_checkpoints(run)) <= 1
    in_use = {read_meta(p).hierarchy_version for p in find_checkpoints(run)}
    assert in_use - {0} <= set(snapshot_versions(LAYOUT.hierarchy_dir(run)))
    # The planted secrets: in no file of the run and no console line of either process.
    assert PASSWORD in " ".join(cmd)
    # Every file of the run is scanned: TensorBoard events and status.json included.
    assert any(run.rglob("events.out.tfevents*")) and (run / "status.json").is_file()
    assert files_with_secrets(tmp_path, first + second) == {}
    assert any(ray_tmp.rglob("*.log")) and files_with_secrets(ray_tmp) == {}
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_ctrl_c_to_the_whole_process_group_twice_stops_at_once_and_the_rerun_resumes(tmp_path):
    """A terminal's Ctrl-C reaches every process of the foreground group (the driver and any
    Ray process it started in that group), and an impatient user presses it twice."""
    from hirl_ray.train.checkpoint import find_checkpoints, is_best_copy, read_meta

    env = {**os.environ, "HIRL_RAY_DASHBOARD": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    cmd = _fit_command(tmp_path)
    proc, lines = _start(cmd, env, tmp_path, new_group=True)
    try:
        seen = _wait_for(lambda: any(re.search(r"epoch +1/3", x) for x in lines), 400)
        assert seen, "".join(lines)[-3000:]
        os.killpg(proc.pid, signal.SIGINT)
        assert _wait_for(lambda: any("received: finishing the current epoch" in x
                                     for x in lines), 60) or proc.poll() is not None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # the second press: stop at once
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    assert rc == 128 + signal.SIGINT, out[-3000:]
    said = [x for x in out.splitlines() if x.startswith("hirl-ray: ")]
    assert len(said) == 1, out[-3000:]
    saved = [read_meta(p).epoch for p in find_checkpoints(tmp_path / "run")
             if not is_best_copy(p)]
    assert saved and saved[0] == 1, out[-3000:]  # the checkpoint written before the presses
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert f"resumed at epoch {saved[-1]}" in again.stdout + again.stderr
