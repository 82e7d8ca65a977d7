"""Fault injection: one tiny ``hirl-ray fit`` through the faults a long run meets (issue 14).

``python -m experiments.reliability.fault_injection`` trains a 2-worker HIRL run (an image folder
of random images, two of them unreadable, ``data.on_bad_file=skip``) and, in sequence, on the
same run folder, each fault followed by what a user would do next:

1. ``worker_killed``: SIGKILL to one Ray Train worker process while the epoch after the first
   checkpoint trains; ``train.max_failures=1`` lets Ray Train restart the group from the newest
   checkpoint (no user action).
2. ``nan_stop``: the input batch of a chosen global step (mid-epoch 3) becomes NaN
   (``HIRL_RAY_FAULT_NAN_STEP``, a test hook) under ``train.on_nan=stop``: the run stops naming the
   step, the newest checkpoint is the last good one.
3. ``checkpoint_corrupted``: bytes of the newest ``state.pt`` are flipped on disk; the user reruns
   with ``train.on_nan=skip_step``: the resume skips the damaged checkpoint, redoes that epoch
   (into ``epoch_NNNN-redo1``) and
4. ``nan_skip_step``: skips the same NaN step and trains on;
5. ``sigterm``: SIGTERM to the ``hirl-ray fit`` process after epoch 3's checkpoint: it finishes the
   epoch in flight, saves it and exits with status 143; the same command again resumes and
   finishes the run (final evaluation, ``metrics.json``).

Figures per fault: ``epochs_redone`` (saved epochs trained again), ``checkpoints_lost`` (saved
epochs with no loadable checkpoint afterwards), ``files_skipped`` and whether the run went on or
finished. Written to ``experiments/reliability/results.json`` (README "Reliability" quotes it)
and printed as a table. ``tests/test_fault_injection.py`` runs it into a temporary folder.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results.json"
RUN_NAME = "run"
MARKER_ENV = "HIRL_RAY_FAULT_RUN"  # marks this scenario's processes (Ray workers inherit it)
WORKER_TITLE = b"ray::RayTrainWorker"  # Ray's process title of a Ray Train worker actor


# ---- data and command -------------------------------------------------------------------------

def _png(rng: np.random.Generator, base: int) -> bytes:
    arr = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def make_image_folder(root: Path, classes: int = 4, per_class: int = 12) -> list[str]:
    """``root/{train,val}/<class>/*.png`` of noisy class colours, plus two unreadable training
    files (a truncated JPEG, a PNG with scrambled pixel data) that only decoding finds."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        for split, n in (("train", per_class), ("val", 3)):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{i:02d}.png").write_bytes(_png(rng, 40 + 50 * c))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    truncated = root / "train" / "c0" / "bad_truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    scrambled = bytearray(_png(rng, 128))
    start = scrambled.index(b"IDAT") + 4
    scrambled[start:start + 64] = rng.bytes(64)
    (root / "train" / "c1" / "bad_scrambled.png").write_bytes(bytes(scrambled))
    return [str(truncated), str(root / "train" / "c1" / "bad_scrambled.png")]


def overrides(work: Path, data_root: Path, epochs: int) -> dict[str, Any]:
    """A fit of a few seconds per epoch on 2 CPUs: 6 steps per epoch, 2 workers."""
    return {
        "data.name": "imagefolder", "data.root": str(data_root), "data.on_bad_file": "skip",
        "model.width": 16, "method.hidden_dim": 64, "method.proj_dim": 32,
        "hirl.num_clusters": [12, 4], "hirl.warmup_epochs": 1, "hirl.rebuild_every_epochs": 1,
        "hirl.num_neg_paths": 16, "hirl.kmeans_nredo": 1, "hirl.kmeans_iters": 10,
        "hirl.async_rebuild": False, "train.epochs": epochs, "train.batch_size": 8,
        "train.num_workers": 2, "train.max_failures": 1, "eval.protocols": ["knn"],
        "storage.path": str(work), "storage.name": RUN_NAME,
    }


def steps_per_epoch(opts: dict[str, Any]) -> int:
    """Global steps per epoch (what the workers' loaders give; Ray-free)."""
    from hirl_ray.config import load_config
    from hirl_ray.data import build_dataset
    from hirl_ray.train.steps import build_train_loader

    cfg = load_config(None, opts)
    train_set = build_dataset(cfg.data, "train")
    return len(build_train_loader(cfg, train_set, lambda x: x, 0, cfg.train.num_workers))


def fit_command(opts: dict[str, Any]) -> list[str]:
    args = [f"{k}=[{','.join(map(str, v))}]" if isinstance(v, list) else f"{k}={v}"
            for k, v in opts.items()]
    return [sys.executable, "-m", "hirl_ray.cli", "fit", *args]


# ---- the run folder -----------------------------------------------------------------------------

def checkpoints(run: Path) -> dict[str, dict[str, Any]]:
    """Every complete epoch checkpoint folder: epoch, write time and whether it loads."""
    from hirl_ray.train.checkpoint import (
        CheckpointError,
        find_checkpoints,
        is_best_copy,
        read_meta,
        verify_checkpoint,
    )

    out = {}
    for path in find_checkpoints(run):
        if is_best_copy(path):
            continue
        try:
            verify_checkpoint(path)
            good = True
        except CheckpointError:
            good = False
        meta = read_meta(path)
        out[Path(path).name] = {"epoch": meta.epoch, "mtime": Path(path, "meta.json").stat()
                                .st_mtime, "good": good, "metrics": meta.metrics}
    return out


def good_epochs(run: Path) -> set[int]:
    return {c["epoch"] for c in checkpoints(run).values() if c["good"]}


def rewritten(before: dict[str, dict[str, Any]], run: Path, since: float) -> set[int]:
    """Saved epochs (in ``before``) whose checkpoint was written again after ``since``."""
    saved = {c["epoch"] for c in before.values() if c["good"]}
    return {c["epoch"] for c in checkpoints(run).values() if c["mtime"] > since} & saved


def wait_for(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


# ---- processes ----------------------------------------------------------------------------------

class Fit:
    """``hirl-ray fit`` in a subprocess; its console lines collected as they come."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, cwd=cwd)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                        daemon=True)
        self._reader.start()

    def wait(self, timeout_s: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=30)
        return rc

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def last_line(self) -> str:
        """The driver's own last line (``hirl-ray: …``); worker lines can arrive after it."""
        mine = [x.strip() for x in self.lines if x.startswith("hirl-ray:")]
        return mine[-1] if mine else next((x.strip() for x in reversed(self.lines)
                                           if x.strip()), "")

    def ray_did_not_start(self) -> bool:
        """Ray's fixed 30 s wait for its raylet ran out (seen on an overloaded machine)."""
        return self.proc.returncode not in (None, 0) and "timed out during startup" in self.text


def start(cmd: list[str], env: dict[str, str], cwd: Path, phase: Callable[[Fit], None],
          timeout_s: float, retries: list[str]) -> Fit:
    """Run one fit with ``phase`` acting on it while it runs; again (up to twice) if Ray itself
    did not start, as a user would rerun (each such retry is recorded in ``retries``)."""
    for _ in range(3):
        fit = Fit(cmd, env, cwd)
        phase(fit)
        fit.wait(timeout_s)
        if not fit.ray_did_not_start():
            return fit
        retries.append(fit.last_line())
    return fit


def train_worker_pids(marker: str) -> list[int]:
    """Ray Train worker processes of this scenario's fit (found by their title and the marker
    in their environment, so another Ray on the machine is never touched)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(WORKER_TITLE):
                continue
            if f"{MARKER_ENV}={marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return sorted(found)


def resumed_at(text: str) -> int | None:
    found = re.findall(r"resumed at epoch (\d+)", text)
    return int(found[0]) if found else None


# ---- the scenario -------------------------------------------------------------------------------

def run_scenario(work: Path, epochs: int = 6, timeout_s: float = 600.0) -> dict[str, Any]:
    """The five faults in sequence on one run folder under ``work``; the figures."""
    if epochs < 5:
        raise ValueError("the sequence needs epochs >= 5 (NaN in epoch 3, SIGTERM after 3)")
    work.mkdir(parents=True, exist_ok=True)
    data_root = work / "data"
    bad_files = make_image_folder(data_root)
    run = work / RUN_NAME
    opts = overrides(work, data_root, epochs)
    spe = steps_per_epoch(opts)
    nan_step = 2 * spe + spe // 2  # mid-epoch 3 (0-based global step)
    marker = f"{os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "HIRL_RAY_DASHBOARD": "0", "PYTHONPATH": str(ROOT), MARKER_ENV: marker,
           "HIRL_RAY_FAULT_NAN_STEP": str(nan_step)}
    env.pop("RAY_ADDRESS", None)  # always a local Ray of its own
    faults: list[dict[str, Any]] = []
    retries: list[str] = []  # fits rerun because Ray itself did not start (machine overload)
    logs: dict[str, str] = {}
    started = time.monotonic()

    # -- run 1: a worker killed mid-epoch 2, then the NaN of epoch 3 under on_nan=stop --------
    kill: dict[str, Any] = {"fault": "worker_killed",
                            "recovery": "automatic (train.max_failures=1)"}
    before: dict[str, dict[str, Any]] = {}
    t_kill = time.time()

    def kill_a_worker(fit: Fit) -> None:
        nonlocal before, t_kill
        kill.pop("not_run", None)
        if not (wait_for(lambda: 1 in good_epochs(run) or fit.proc.poll() is not None,
                         timeout_s) and fit.proc.poll() is None):
            kill["not_run"] = "epoch 1's checkpoint never appeared"
            return
        pids: list[int] = []
        wait_for(lambda: bool(pids.extend(train_worker_pids(marker)) or pids), 60)
        before, t_kill = checkpoints(run), time.time()  # the workers are past epoch 1
        if not pids:
            kill["not_run"] = "no Ray Train worker process found"
            return
        os.kill(pids[-1], signal.SIGKILL)
        kill["in_flight_epoch"] = max(c["epoch"] for c in before.values()) + 1

    first = start(fit_command({**opts, "train.on_nan": "stop"}), env, work, kill_a_worker,
                  timeout_s, retries)
    rc1 = first.proc.returncode
    logs["run1"] = first.text
    after1 = checkpoints(run)
    if "not_run" not in kill:
        kill.update(
            epochs_redone=len(rewritten(before, run, t_kill)),
            checkpoints_lost=len({c["epoch"] for c in before.values() if c["good"]}
                                 - good_epochs(run)),
            went_on=max((c["epoch"] for c in after1.values()), default=0) > max(
                c["epoch"] for c in before.values()))
    faults.append(kill)

    message = first.last_line()
    m = re.search(r"epoch (\d+), step (\d+) \(train.on_nan=stop\)", message)
    saved1 = good_epochs(run)
    faults.append({
        "fault": "nan_stop", "recovery": "rerun with train.on_nan=skip_step",
        "nan_step": nan_step, "exit_code": rc1, "message": message,
        "stopped_at_step": int(m.group(2)) if m else None,
        "stopped_in_epoch": int(m.group(1)) if m else None,
        "saved_epochs": sorted(saved1),
        # The epoch with the NaN is never reported: nothing saved is lost or redone by the stop.
        "epochs_redone": 0, "checkpoints_lost": 0,
    })

    # -- between runs: flip bytes of the newest checkpoint's state.pt ----------------------------
    newest_name = max(after1, key=lambda n: (after1[n]["epoch"], n)) if after1 else None
    corrupt: dict[str, Any] = {"fault": "checkpoint_corrupted",
                               "recovery": "rerun (falls back to the previous good checkpoint)"}
    if newest_name is None:
        corrupt["not_run"] = "run 1 left no checkpoint"
    else:
        state = run / "train" / newest_name / "state.pt"
        data = bytearray(state.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        state.write_bytes(bytes(data))
        corrupt["corrupted"] = f"train/{newest_name}/state.pt"
        corrupt["corrupted_epoch"] = after1[newest_name]["epoch"]

    # -- run 2: resume (fallback), skip the NaN step, SIGTERM after epoch 3's checkpoint ---------
    cmd = fit_command({**opts, "train.on_nan": "skip_step"})
    t2 = time.time()
    term: dict[str, Any] = {"fault": "sigterm", "recovery": "rerun the same command"}
    newer = lambda: any(c["epoch"] >= 3 and c["good"] and c["mtime"] > t2  # noqa: E731
                        for c in checkpoints(run).values())

    def terminate(fit: Fit) -> None:
        term.pop("not_run", None)
        if wait_for(lambda: newer() or fit.proc.poll() is not None, timeout_s) \
                and fit.proc.poll() is None:
            fit.proc.send_signal(signal.SIGTERM)  # to the driver only, as a scheduler would
            term["sent_after_epoch"] = max(c["epoch"] for c in checkpoints(run).values()
                                           if c["good"])
        else:
            term["not_run"] = "run 2 ended before epoch 3's checkpoint"

    second = start(cmd, env, work, terminate, timeout_s, retries)
    rc2 = second.proc.returncode
    logs["run2"] = second.text
    if "not_run" not in corrupt:
        at = resumed_at(second.text)
        corrupt.update(
            resumed_at_epoch=at, warned="damaged checkpoint" in second.text,
            epochs_redone=(corrupt["corrupted_epoch"] - at) if at is not None else None,
            checkpoints_lost=len(saved1 - good_epochs(run)))
    faults.append(corrupt)
    nan_metrics = [c["metrics"].get("nan_skipped", 0) for c in checkpoints(run).values()
                   if c["mtime"] > t2]
    faults.append({
        "fault": "nan_skip_step", "recovery": "none needed (the step changed nothing)",
        "nan_step": nan_step, "steps_skipped": int(sum(nan_metrics)),
        "went_on": any(c["epoch"] >= 3 and c["mtime"] > t2 for c in checkpoints(run).values()),
        "epochs_redone": 0, "checkpoints_lost": 0,
    })

    # -- run 3: the same command again resumes and finishes ----------------------------------------
    saved2 = good_epochs(run)
    term.update(exit_code=rc2, message=second.last_line(), saved_epochs=sorted(saved2))
    third = start(cmd, env, work, lambda fit: None, timeout_s, retries)
    rc3 = third.proc.returncode
    logs["run3"] = third.text
    if "not_run" not in term:
        at = resumed_at(third.text)
        term.update(resumed_at_epoch=at,
                    epochs_redone=(max(saved2) - at) if at is not None else None,
                    checkpoints_lost=len(saved2 - good_epochs(run)))
    faults.append(term)

    metrics_file = run / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    final = good_epochs(run)
    done = [f for f in faults if "not_run" not in f]
    result = {
        "command": "python -m experiments.reliability.fault_injection",
        "setup": {"epochs": epochs, "workers": 2, "steps_per_epoch": spe, "nan_step": nan_step,
                  "train_images": 4 * 12 + len(bad_files), "unreadable_files": len(bad_files),
                  "data.on_bad_file": "skip", "train.max_failures": 1},
        "faults": faults,
        "final": {
            "exit_code": rc3, "finished": rc3 == 0 and metrics_file.is_file(),
            "saved_epochs": sorted(final), "all_epochs_saved": final == set(range(1, epochs + 1)),
            "files_skipped": metrics.get("data/bad_files_skipped"),
            "knn_acc": {k: v for k, v in metrics.items() if k.startswith("knn_acc")},
        },
        "totals": {
            "epochs_redone": sum(f.get("epochs_redone") or 0 for f in done),
            "checkpoints_lost": sum(f.get("checkpoints_lost") or 0 for f in done),
            "files_skipped": metrics.get("data/bad_files_skipped"),
            "faults_run": len(done), "faults_not_run": len(faults) - len(done),
        },
        "fits_rerun_because_ray_did_not_start": len(retries),
        "seconds": round(time.monotonic() - started, 1),
    }
    (work / "console.json").write_text(json.dumps(logs, indent=1))
    return result


def table(result: dict[str, Any]) -> str:
    rows = [f"{'fault':<22} {'epochs redone':>13} {'ckpts lost':>10}  outcome"]
    for f in result["faults"]:
        if "not_run" in f:
            outcome = f"not run: {f['not_run']}"
        else:
            outcome = f["recovery"]
        rows.append(f"{f['fault']:<22} {f.get('epochs_redone', '-')!s:>13} "
                    f"{f.get('checkpoints_lost', '-')!s:>10}  {outcome}")
    fin, tot = result["final"], result["totals"]
    rows.append(f"final: finished={fin['finished']} saved epochs {fin['saved_epochs']}, "
                f"files skipped {fin['files_skipped']}; total epochs redone "
                f"{tot['epochs_redone']}, checkpoints lost {tot['checkpoints_lost']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="run folder root (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where the figures go")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per fit")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hirl-faults-") as tmp:
        result = run_scenario(args.work or Path(tmp), args.epochs, args.timeout)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"figures: {args.json}")
    return 0 if result["final"]["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
