"""Hierarchy snapshots on a local folder or an ``s3://`` prefix.

The hierarchy actor saves every rebuild and reloads the newest one in ``__init__``: restarted
Ray actors do not restore state by themselves (ray PR #32153), and official HIRL recomputes
clusters on resume instead of restoring them. Writes are atomic (see
:func:`hirl_ray.storage.write_bytes`) so a crash mid-save never leaves a truncated
``hierarchy_v*.pt`` behind.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from hirl_ray import storage
from hirl_ray.hierarchy.kmeans import PrototypeHierarchy

_FORMAT = 1
_NAME = re.compile(r"^hierarchy_v(\d{6,})\.pt$")
_FIELDS = ("centroids", "parents", "assignments", "densities")


def snapshot_name(version: int) -> str:
    """File name of the snapshot for ``version``: ``hierarchy_v{version:06d}.pt``."""
    return f"hierarchy_v{version:06d}.pt"


@dataclass(frozen=True)
class Origin:
    """Which rebuild round produced a version: ``attempt`` names the worker-group
    incarnation (chosen by rank 0 at start), ``round`` the completed epochs at submission.

    Persisted next to the snapshot (``hierarchy_v{version:06d}.json``) so that a restarted
    actor still knows which waits a version answers.
    """

    version: int
    attempt: int
    round: int


def origin_name(version: int) -> str:
    """File name of the origin record for ``version``."""
    return f"hierarchy_v{version:06d}.json"


def save_hierarchy(h: PrototypeHierarchy, directory: str | Path,
                   origin: Origin | None = None) -> str:
    """Write ``h`` to ``directory/hierarchy_v{version:06d}.pt`` atomically.

    Args:
        h: The hierarchy (tensors may live on any device; they are saved from CPU).
        directory: A local folder (created if missing) or an ``s3://`` prefix.
        origin: The round that built ``h``; written first, so a snapshot that exists
            always has its origin next to it.

    Returns:
        The path (or URI) written.
    """
    if h.version < 0:
        raise ValueError(f"save_hierarchy: version must be >= 0, got {h.version}")
    final = storage.join(directory, snapshot_name(h.version))
    if origin is not None:
        storage.write_text(storage.join(directory, origin_name(h.version)),
                           json.dumps(origin.__dict__))
    payload = {"format": _FORMAT, "version": h.version}
    for name in _FIELDS:
        payload[name] = [t.detach().cpu() for t in getattr(h, name)]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    # Local: "*.tmp" then os.replace (latest_snapshot ignores *.tmp if we die first);
    # S3: the object appears only once its upload completes.
    storage.write_bytes(final, buffer.getvalue())
    return final


def load_hierarchy(path: str | Path) -> PrototypeHierarchy:
    """Read a snapshot written by :func:`save_hierarchy` (CPU tensors).

    Raises:
        ValueError: The file is not a readable hierarchy snapshot (message names the file).
    """
    data = storage.read_bytes(str(path))  # FileNotFoundError propagates
    try:
        # weights_only: a snapshot is tensors, ints and lists; never unpickle arbitrary objects.
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if payload.get("format") != _FORMAT:
            raise ValueError(f"unknown format {payload.get('format')!r}")
        return PrototypeHierarchy(
            version=int(payload["version"]), **{name: tuple(payload[name]) for name in _FIELDS}
        )
    except Exception as e:  # corrupt pickle, missing key, inconsistent shapes, ...
        raise ValueError(
            f"{path}: not a valid hierarchy snapshot ({e}); delete it so the "
            "hierarchy is rebuilt, or restore it from a backup"
        ) from e


def latest_snapshot(directory: str | Path) -> str | None:
    """The snapshot with the highest version in ``directory``, or ``None`` if there is none.

    Leftover temporary files from interrupted saves (``*.tmp``) and other files are ignored.
    """
    best: tuple[int, str] | None = None
    for name, is_dir in storage.list_dir(str(directory)):
        match = _NAME.match(name)
        if match and not is_dir:
            version = int(match.group(1))
            if best is None or version > best[0]:
                best = (version, storage.join(directory, name))
    return None if best is None else best[1]


def snapshot_versions(directory: str | Path) -> list[int]:
    """Versions with a snapshot file in ``directory``, ascending."""
    return sorted(int(m.group(1)) for name, is_dir in storage.list_dir(str(directory))
                  if not is_dir and (m := _NAME.match(name)))


def delete_snapshot(directory: str | Path, version: int) -> None:
    """Remove a version's snapshot, then its origin record (an origin without its snapshot
    answers no round: :func:`read_origins` needs both)."""
    storage.delete_file(storage.join(directory, snapshot_name(version)))
    storage.delete_file(storage.join(directory, origin_name(version)))


def read_origins(directory: str | Path) -> dict[int, Origin]:
    """Origins of every version in ``directory`` that has both its snapshot and its record.

    Unreadable records are skipped: a version without an origin answers no round.
    """
    names = {name for name, is_dir in storage.list_dir(str(directory)) if not is_dir}
    found: dict[int, Origin] = {}
    for name in names:
        match = _NAME.match(name)
        if not match or origin_name(int(match.group(1))) not in names:
            continue
        try:
            record = json.loads(storage.read_text(storage.join(directory, origin_name(
                int(match.group(1))))))
            found[int(record["version"])] = Origin(int(record["version"]),
                                                   int(record["attempt"]), int(record["round"]))
        except (ValueError, KeyError, OSError):
            continue
    return found
