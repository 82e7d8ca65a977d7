"""Training checkpoints: one folder per epoch with ``state.pt``, ``manifest.json``, ``meta.json``.

A checkpoint holds the model (including target networks and queues), optimizer,
AMP scaler, the number of completed epochs, the global step and the hierarchy
version the workers were using, plus the resolved config (secrets redacted) so that
:func:`hirl_ray.load_backbone` needs nothing else. Folders may be local or on S3
(:mod:`hirl_ray.storage`); each file is written atomically and ``meta.json`` last, so a
crash never leaves a folder that looks complete.

``manifest.json`` holds the SHA-256 of ``state.pt`` and ``meta.json``; :func:`load_state`
checks both, so a torn upload or a damaged object is refused (and a resume falls back to the
previous checkpoint) instead of loading garbage. ``state.pt`` holds only tensors, numbers,
strings and containers (:func:`plain_state`) and is read with ``weights_only=True``: a
checkpoint from a shared bucket cannot run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hirl_ray import storage
from hirl_ray.logs import get_logger, redact
from hirl_ray.runs import LAYOUT

STATE_FILE = "state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
#: Folder-name prefix of the copy of the best checkpoint (kept beyond ``keep_checkpoints``).
BEST_PREFIX = "best_"
_MANIFEST_FORMAT = 1

log = get_logger(__name__)


class CheckpointError(ValueError):
    """A checkpoint folder is torn or damaged (its files do not match the manifest)."""


class UnsafeCheckpointError(CheckpointError):
    """``state.pt`` needs arbitrary unpickling (``weights_only=True`` refuses it)."""


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself (``meta.json``)."""

    epoch: int  # completed epochs
    step: int
    hierarchy_version: int
    config: dict[str, Any]
    metrics: dict[str, Any]


def plain_state(value: Any, where: str = "state") -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads back: tensors, numbers,
    strings, ``None`` and dicts/lists/tuples of them (numpy values and dataclasses converted).

    Raises:
        TypeError: Something else (names where), at save time rather than at resume.
    """
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.Size)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain_state(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if isinstance(value, list) else tuple(out)
    raise TypeError(f"{where} is a {type(value).__name__}, which a weights_only checkpoint "
                    "cannot hold; store tensors, numbers, strings or containers of them")


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def save_checkpoint(directory: str | Path, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], scaler_state: dict[str, Any] | None,
                    meta: CheckpointMeta) -> str:
    """Write ``state.pt``, ``manifest.json``, then ``meta.json`` (which marks it complete)."""
    state = plain_state({"model": model_state, "optimizer": optimizer_state,
                         "scaler": scaler_state})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    state_bytes = buffer.getvalue()
    meta_bytes = json.dumps(redact(meta.__dict__), indent=2, default=float).encode()
    manifest = {"format": _MANIFEST_FORMAT,
                "files": {STATE_FILE: _digest(state_bytes), META_FILE: _digest(meta_bytes)}}
    storage.write_bytes(storage.join(directory, STATE_FILE), state_bytes)
    storage.write_text(storage.join(directory, MANIFEST_FILE), json.dumps(manifest, indent=2))
    storage.write_bytes(storage.join(directory, META_FILE), meta_bytes)
    return str(directory)


def read_meta(directory: str | Path) -> CheckpointMeta:
    """Read ``meta.json`` of a checkpoint folder (local or ``s3://``)."""
    try:
        data = storage.read_bytes(storage.join(directory, META_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not a hirl_ray checkpoint (no {META_FILE}); "
                                f"pass a folder like <run>/{LAYOUT.train}/epoch_0010") from None
    try:
        return CheckpointMeta(**json.loads(data.decode()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{directory}/{META_FILE} is damaged ({e})") from None


def _manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest, or ``None`` for a checkpoint written before manifests existed."""
    path = storage.join(directory, MANIFEST_FILE)
    try:
        return json.loads(storage.read_text(path))["files"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is damaged ({e})") from None


def _check(directory: str | Path, name: str, data: bytes, files: dict[str, Any]) -> None:
    expected = files.get(name)
    if expected is None:
        return
    got = _digest(data)
    if got != expected:
        raise CheckpointError(
            f"{directory}/{name} does not match its manifest ({got['bytes']} bytes, sha256 "
            f"{got['sha256'][:12]}…; expected {expected['bytes']} bytes, "
            f"{str(expected['sha256'])[:12]}…): torn or damaged")


def verify_checkpoint(directory: str | Path) -> None:
    """Check ``state.pt`` and ``meta.json`` against ``manifest.json`` (reads both files).

    Raises:
        CheckpointError: A file is missing, torn or damaged. Checkpoints older than manifests
            pass unchecked.
    """
    files = _manifest(directory)
    if files is None:
        return
    for name in (STATE_FILE, META_FILE):
        try:
            data = storage.read_bytes(storage.join(directory, name))
        except FileNotFoundError:
            raise CheckpointError(f"{directory}/{name} is missing") from None
        _check(directory, name, data, files)


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``state.pt`` (model/optimizer/scaler states), verified and with ``weights_only``.

    Raises:
        CheckpointError: Torn or damaged (does not match the manifest, or unreadable).
        UnsafeCheckpointError: It holds objects ``weights_only=True`` refuses (an old format).
    """
    data = storage.read_bytes(storage.join(directory, STATE_FILE))
    files = _manifest(directory)
    if files is not None:
        _check(directory, STATE_FILE, data, files)
        _check(directory, META_FILE,
               storage.read_bytes(storage.join(directory, META_FILE)), files)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines()
                       if "Unsupported global" in line), str(e).splitlines()[0])
        reason = reason.partition(" was not an allowed global")[0].removeprefix(
            "WeightsUnpickler error: ")
        raise UnsafeCheckpointError(
            f"{directory}/{STATE_FILE} holds objects that weights_only loading refuses "
            f"({reason}); it was written by an older hirl_ray: if you trust where it came "
            "from, convert it once with hirl_ray.train.checkpoint.resave_trusted(path)") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{directory}/{STATE_FILE} is unreadable "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              ) from None


def resave_trusted(directory: str | Path) -> None:
    """Rewrite an old checkpoint (arbitrary pickle) in the ``weights_only`` format.

    Unpickles with ``weights_only=False``: only for checkpoints from a trusted source.
    """
    data = storage.read_bytes(storage.join(directory, STATE_FILE))
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    save_checkpoint(directory, model_state=state["model"], optimizer_state=state["optimizer"],
                    scaler_state=state.get("scaler"), meta=read_meta(directory))


def is_best_copy(path: str | Path) -> bool:
    """Whether a checkpoint folder is the kept copy of the best checkpoint."""
    return str(path).rstrip("/").rpartition("/")[2].startswith(BEST_PREFIX)


def find_checkpoints(run_dir: str | Path) -> list[str]:
    """Complete checkpoints in the run's ``train/`` folder, oldest first (by completed epoch).

    A folder counts only when both files are there: a crash mid-write leaves none
    that could be mistaken for a checkpoint. A folder whose ``meta.json`` cannot be read is
    skipped with a warning. At equal epochs the best copy comes before the epoch folder.
    """
    root = LAYOUT.train_dir(run_dir)
    found = []
    for name, is_dir in storage.list_dir(root):
        if not is_dir:
            continue
        path = storage.join(root, name)
        files = {n for n, _ in storage.list_dir(path)}
        if not {META_FILE, STATE_FILE} <= files:
            continue
        try:
            epoch = read_meta(path).epoch
        except (CheckpointError, OSError) as e:
            log.warning("skipping checkpoint %s: %s", path, e)
            continue
        found.append((epoch, not is_best_copy(path), name, path))
    return [path for *_, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The checkpoint with the most completed epochs, or ``None``."""
    found = find_checkpoints(run_dir)
    return found[-1] if found else None


def newest_checkpoint_config(run_dir: str | Path) -> tuple[str, dict[str, Any]] | None:
    """``(path, config)`` of the run's newest checkpoint, or ``None`` (for
    :func:`hirl_ray.runs.prepare_run`'s compatibility check)."""
    newest = latest_checkpoint(run_dir)
    return None if newest is None else (newest, read_meta(newest).config)


def latest_good_checkpoint(run_dir: str | Path) -> str | None:
    """The newest checkpoint whose files match its manifest, or ``None``.

    A torn or damaged newer one is skipped with a warning naming it.
    """
    for path in reversed(find_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping damaged checkpoint (%s); using the previous one", e)
            continue
        return path
    return None


def checkpoint_dir_name(run_dir: str | Path, epoch: int) -> str:
    """Folder name for the checkpoint after ``epoch`` epochs: ``epoch_0010``, or
    ``epoch_0010-redo1`` when that folder exists (an epoch redone after its checkpoint was
    found damaged: Ray still lists the old folder, and must never delete the new one with it).
    """
    name = LAYOUT.checkpoint_name(epoch)
    root = LAYOUT.train_dir(run_dir)
    redo, candidate = 0, name
    while storage.exists(storage.join(root, candidate)):
        redo += 1
        candidate = f"{name}-redo{redo}"
    return candidate
