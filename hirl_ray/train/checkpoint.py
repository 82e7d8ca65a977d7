"""Training checkpoints: one folder per epoch with ``state.pt`` and ``meta.json``.

A checkpoint holds the model (including target networks and queues), optimizer,
AMP scaler, the number of completed epochs, the global step and the hierarchy
version the workers were using, plus the resolved config so that
:func:`hirl_ray.load_backbone` needs nothing else. Folders may be local or on S3
(:mod:`hirl_ray.storage`); writes are atomic, so a crash never leaves a half-written
checkpoint.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hirl_ray import storage
from hirl_ray.runs import LAYOUT

STATE_FILE = "state.pt"
META_FILE = "meta.json"


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself (``meta.json``)."""

    epoch: int  # completed epochs
    step: int
    hierarchy_version: int
    config: dict[str, Any]
    metrics: dict[str, Any]


def save_checkpoint(directory: str | Path, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], scaler_state: dict[str, Any] | None,
                    meta: CheckpointMeta) -> str:
    """Write ``state.pt`` then ``meta.json`` (the meta file marks the checkpoint complete)."""
    state = {"model": model_state, "optimizer": optimizer_state, "scaler": scaler_state}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(storage.join(directory, STATE_FILE), buffer.getvalue())
    storage.write_text(storage.join(directory, META_FILE),
                       json.dumps(meta.__dict__, indent=2, default=float))
    return str(directory)


def read_meta(directory: str | Path) -> CheckpointMeta:
    """Read ``meta.json`` of a checkpoint folder (local or ``s3://``)."""
    try:
        text = storage.read_text(storage.join(directory, META_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not a hirl_ray checkpoint (no {META_FILE}); "
                                f"pass a folder like <run>/{LAYOUT.train}/epoch_0010") from None
    return CheckpointMeta(**json.loads(text))


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt`` (model/optimizer/scaler states)."""
    data = storage.read_bytes(storage.join(directory, STATE_FILE))
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)


def find_checkpoints(run_dir: str | Path) -> list[str]:
    """Complete checkpoints in the run's ``train/`` folder, oldest first (by completed epoch).

    A folder counts only when both files are there: a crash mid-write leaves none
    that could be mistaken for a checkpoint.
    """
    root = LAYOUT.train_dir(run_dir)
    found = []
    for name, is_dir in storage.list_dir(root):
        if not is_dir:
            continue
        files = {n for n, _ in storage.list_dir(storage.join(root, name))}
        if {META_FILE, STATE_FILE} <= files:
            found.append(storage.join(root, name))
    return sorted(found, key=lambda p: read_meta(p).epoch)


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The checkpoint with the most completed epochs, or ``None``."""
    found = find_checkpoints(run_dir)
    return found[-1] if found else None
