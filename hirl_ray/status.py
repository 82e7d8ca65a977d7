"""``status.json``: the small state file a fit keeps in its run folder, and ``hirl-ray status``.

Rank 0 rewrites it atomically (:func:`hirl_ray.storage.write_text`) at least every
``observe.status_every_s`` during an epoch and after every epoch; the driver marks the end
(``finished``, ``stopped``, ``failed``). Reading it needs no Ray: ``hirl-ray status RUN`` works
from another shell on a running fit and on a finished one, on a local folder or ``s3://``.
No Ray here.
"""

from __future__ import annotations

import json
import time
from typing import Any

from hirl_ray import storage
from hirl_ray.runs import LAYOUT

STATUS_FILE = LAYOUT.status


def status_file(run_dir: str) -> str:
    return LAYOUT.status_file(run_dir)


def write_status(run_dir: str, status: dict[str, Any]) -> None:
    """Replace the run's status (atomic), stamped with the time of writing."""
    body = {**status, "updated_unix": time.time()}
    storage.write_text(status_file(run_dir), json.dumps(body, indent=1, default=float))


def read_status(run_dir: str) -> dict[str, Any] | None:
    """The run's status, or ``None`` when it has none (not started, or an older hirl_ray)."""
    try:
        return json.loads(storage.read_text(status_file(run_dir)))
    except FileNotFoundError:
        return None


def mark(run_dir: str, state: str, **extra: Any) -> None:
    """Set ``state`` (``finished``, ``stopped``, ``failed``) keeping the rest; no-op without a
    status file (the run never reached its first step)."""
    status = read_status(run_dir)
    if status is not None:
        write_status(run_dir, {**status, "state": state, **extra})


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h:d}:{m:02d}:{s:02d}" if d or h else f"{m:d}:{s:02d}")


def format_status(run_dir: str, status: dict[str, Any] | None, now: float | None = None) -> str:
    """What ``hirl-ray status RUN`` prints."""
    if status is None:
        return (f"{run_dir}: no {STATUS_FILE} (the fit has not reached its first step, or was "
                "written by an older hirl_ray)")
    now = time.time() if now is None else now
    age = now - status.get("updated_unix", now)
    h = status.get("hierarchy") or {}
    rebuild = status.get("last_rebuild") or {}
    lines = [
        f"Run          {run_dir}",
        f"State        {status.get('state', '?')} (updated {_duration(age)} ago)",
        f"Epoch        {status.get('epoch', 0)}/{status.get('epochs', '?')} done; step "
        f"{status.get('step', 0)}/{status.get('total_steps', '?')} "
        f"({status.get('epoch_step', 0)}/{status.get('steps_per_epoch', '?')} in this epoch)",
        f"Loss         {status.get('loss', float('nan')):.4f}"
        + (f"  (ssl {status['ssl_loss']:.4f}, semantic {status['semantic_loss']:.4f})"
           if status.get("semantic_loss") is not None else ""),
        f"Throughput   {status.get('samples_per_s', 0.0):,.0f} samples/s; ETA epoch "
        f"{_duration(status.get('eta_epoch_s'))}, run {_duration(status.get('eta_run_s'))}",
        f"Hierarchy    {h.get('state', '-')}",
        f"Checkpoint   {status.get('last_checkpoint') or '-'}",
    ]
    if rebuild:
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in (rebuild.get("phases") or {}).items())
        lines.append(f"Last rebuild v{rebuild.get('version')}: {rebuild.get('seconds', 0):.1f}s"
                     + (f" ({phases})" if phases else "")
                     + (f"; peak memory {rebuild['peak_rss_gb']:.2f} GB"
                        if rebuild.get("peak_rss_gb") else "")
                     + (f"; {rebuild['superseded']} round(s) superseded"
                        if rebuild.get("superseded") else ""))
    if status.get("error"):
        lines.append(f"Error        {status['error']}")
    tb = status.get("tensorboard")
    if tb:
        lines.append(f"TensorBoard  tensorboard --logdir {tb}")
    if status.get("mlflow"):
        lines.append(f"MLflow       {status['mlflow']}")
    if status.get("wandb"):
        lines.append(f"W&B          {status['wandb']}")
    return "\n".join(lines)


def run_dir_of(path: str) -> str:
    """A run folder given itself or one of its checkpoint folders."""
    path = storage.resolve(path.rstrip("/"))
    return LAYOUT.run_of_checkpoint(path) or path
