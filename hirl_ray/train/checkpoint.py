"""Training checkpoints: one folder per epoch with ``state.pt`` and ``meta.json``.

A checkpoint holds the model (including target networks and queues), optimizer,
AMP scaler, the number of completed epochs, the global step and the hierarchy
version the workers were using, plus the resolved config so that
:func:`hirl_ray.load_backbone` needs nothing else. Files are written under a
temporary name and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: str | Path, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], scaler_state: dict[str, Any] | None,
                    meta: CheckpointMeta) -> Path:
    """Write ``state.pt`` then ``meta.json`` (the meta file marks the checkpoint complete)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"model": model_state, "optimizer": optimizer_state, "scaler": scaler_state}
    _atomic_write_bytes(directory / STATE_FILE, lambda f: torch.save(state, f))
    payload = json.dumps(meta.__dict__, indent=2, default=float).encode()
    _atomic_write_bytes(directory / META_FILE, lambda f: f.write(payload))
    return directory


def read_meta(directory: str | Path) -> CheckpointMeta:
    """Read ``meta.json`` of a checkpoint folder."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a hirl_ray checkpoint (no {META_FILE}); "
                                "pass a folder like <run>/train/epoch_0010")
    return CheckpointMeta(**json.loads(path.read_text()))


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt`` (model/optimizer/scaler states)."""
    return torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=False)


def find_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``run_dir/train``, oldest first (by completed epoch)."""
    root = Path(run_dir) / "train"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and (p / META_FILE).is_file()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: read_meta(p).epoch)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the most completed epochs, or ``None``."""
    found = find_checkpoints(run_dir)
    return found[-1] if found else None
