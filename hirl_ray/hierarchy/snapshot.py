"""Hierarchy snapshots on the local filesystem.

The hierarchy actor saves every rebuild and reloads the newest one in ``__init__``: restarted
Ray actors do not restore state by themselves (ray PR #32153), and official HIRL recomputes
clusters on resume instead of restoring them. Writes are atomic (temporary file, then
``os.replace``) so a crash mid-save never leaves a truncated ``hierarchy_v*.pt`` behind.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from hirl_ray.hierarchy.kmeans import PrototypeHierarchy

_FORMAT = 1
_NAME = re.compile(r"^hierarchy_v(\d{6,})\.pt$")
_FIELDS = ("centroids", "parents", "assignments", "densities")


def snapshot_name(version: int) -> str:
    """File name of the snapshot for ``version``: ``hierarchy_v{version:06d}.pt``."""
    return f"hierarchy_v{version:06d}.pt"


def save_hierarchy(h: PrototypeHierarchy, directory: str | Path) -> Path:
    """Write ``h`` to ``directory/hierarchy_v{version:06d}.pt`` atomically.

    Args:
        h: The hierarchy (tensors may live on any device; they are saved from CPU).
        directory: Created if missing.

    Returns:
        The path written.
    """
    if h.version < 0:
        raise ValueError(f"save_hierarchy: version must be >= 0, got {h.version}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / snapshot_name(h.version)
    payload = {"format": _FORMAT, "version": h.version}
    for name in _FIELDS:
        payload[name] = [t.detach().cpu() for t in getattr(h, name)]
    # Same directory as the target so os.replace is a rename, atomic on POSIX; the ".tmp" suffix
    # keeps it out of latest_snapshot if we die before the rename.
    fd, tmp = tempfile.mkstemp(prefix=final.name + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def load_hierarchy(path: str | Path) -> PrototypeHierarchy:
    """Read a snapshot written by :func:`save_hierarchy` (CPU tensors).

    Raises:
        ValueError: The file is not a readable hierarchy snapshot (message names the file).
    """
    path = Path(path)
    try:
        # weights_only: a snapshot is tensors, ints and lists; never unpickle arbitrary objects.
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != _FORMAT:
            raise ValueError(f"unknown format {payload.get('format')!r}")
        return PrototypeHierarchy(
            version=int(payload["version"]), **{name: tuple(payload[name]) for name in _FIELDS}
        )
    except FileNotFoundError:
        raise
    except Exception as e:  # corrupt pickle, missing key, inconsistent shapes, ...
        raise ValueError(
            f"{path}: not a valid hierarchy snapshot ({e}); delete it so the "
            "hierarchy is rebuilt, or restore it from a backup"
        ) from e


def latest_snapshot(directory: str | Path) -> Path | None:
    """The snapshot with the highest version in ``directory``, or ``None`` if there is none.

    Leftover temporary files from interrupted saves (``*.tmp``) and other files are ignored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            version = int(match.group(1))
            if best is None or version > best[0]:
                best = (version, entry)
    return None if best is None else best[1]
