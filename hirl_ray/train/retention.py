"""Bounded run folders: ``storage.keep_checkpoints``, ``storage.best_metric``,
``storage.keep_snapshots``.

Ray Train deletes checkpoints beyond the newest ``keep_checkpoints`` itself
(``CheckpointConfig(num_to_keep)``: it always keeps the newest, and its run snapshot, which a
new driver reloads, must only name folders that exist, so nothing else may delete them). Two
things Ray cannot do are done here by rank 0 just before it reports a checkpoint:

* the best checkpoint by ``best_metric`` is copied to ``train/best_<name>`` when it is about to
  fall out of the newest ``keep_checkpoints`` (so at most ``keep_checkpoints + 1`` remain);
* hierarchy snapshots beyond the newest ``keep_snapshots`` are deleted, except every version a
  remaining checkpoint resumes with (a resume must find its hierarchy).

No Ray here; :func:`before_report` is called from ``ray_worker.report``.
"""

from __future__ import annotations

import math
from pathlib import Path

from hirl_ray import storage
from hirl_ray.config import StorageConfig
from hirl_ray.hierarchy.snapshot import delete_snapshot, snapshot_versions
from hirl_ray.logs import get_logger
from hirl_ray.runs import LAYOUT
from hirl_ray.train.checkpoint import (
    BEST_PREFIX,
    MANIFEST_FILE,
    META_FILE,
    STATE_FILE,
    CheckpointMeta,
    find_checkpoints,
    is_best_copy,
    read_meta,
)

log = get_logger(__name__)


def metric_value(meta: CheckpointMeta, metric: str) -> float | None:
    """The checkpoint's finite value of ``metric``, else ``None`` (not measured that epoch)."""
    value = meta.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def best_entry(entries: list[tuple[str | None, CheckpointMeta]], metric: str, mode: str
               ) -> tuple[str | None, CheckpointMeta] | None:
    """The entry with the best ``metric`` (``mode`` max/min); the newest wins a tie."""
    scored = [(metric_value(m, metric), i, path, m) for i, (path, m) in enumerate(entries)]
    scored = [s for s in scored if s[0] is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    _, _, path, meta = max(scored, key=lambda s: (sign * s[0], s[1]))
    return path, meta


def copy_checkpoint(src: str, dst: str) -> None:
    """Copy a checkpoint folder file by file, ``meta.json`` last (complete once it is there)."""
    for name in (STATE_FILE, MANIFEST_FILE, META_FILE):
        source = storage.join(src, name)
        if name == MANIFEST_FILE and not storage.exists(source):
            continue
        storage.write_bytes(storage.join(dst, name), storage.read_bytes(source))


def keep_best(run_dir: str | Path, listed: list[tuple[str, CheckpointMeta]],
              new: CheckpointMeta, cfg: StorageConfig) -> str | None:
    """Copy the best checkpoint aside if reporting ``new`` makes Ray delete it.

    Args:
        listed: The run's checkpoints now, oldest first, with their metas.
        new: The checkpoint about to be reported.

    Returns:
        The copy written, or ``None``.
    """
    if cfg.best_metric is None or cfg.keep_checkpoints is None:
        return None
    epochs = [p for p, _ in listed if not is_best_copy(p)]
    # After this report Ray keeps the newest keep_checkpoints: these and the new one.
    survivors = set(epochs[len(epochs) - (cfg.keep_checkpoints - 1):]) \
        if cfg.keep_checkpoints > 1 else set()
    best = best_entry([*listed, (None, new)], cfg.best_metric, cfg.best_mode)
    if best is None or best[0] is None or best[0] in survivors or is_best_copy(best[0]):
        return None
    path, meta = best
    name = path.rstrip("/").rpartition("/")[2]
    target = storage.join(LAYOUT.train_dir(run_dir), f"{BEST_PREFIX}{name}")
    copy_checkpoint(path, target)
    for old, _ in listed:  # older copies go once the new one is complete
        if is_best_copy(old) and old != target:
            storage.delete_dir(old)
    log.info("kept %s (best %s=%.4g) as %s", name, cfg.best_metric,
             metric_value(meta, cfg.best_metric), target)
    return target


def prune_snapshots(run_dir: str | Path, keep: int | None, in_use: set[int]) -> list[int]:
    """Delete snapshots beyond the newest ``keep``, except the versions in ``in_use``.

    Returns the versions deleted.
    """
    if keep is None:
        return []
    directory = LAYOUT.hierarchy_dir(run_dir)
    versions = snapshot_versions(directory)
    kept = set(versions[-keep:]) | in_use
    gone = [v for v in versions if v not in kept]
    for version in gone:
        delete_snapshot(directory, version)
    return gone


def before_report(run_dir: str | Path, new: CheckpointMeta, cfg: StorageConfig) -> None:
    """Rank 0, before reporting ``new``: keep the best checkpoint, prune old snapshots.

    Never fails the epoch: a storage error here is a warning (the next epoch tries again).
    """
    if cfg.keep_snapshots is None and (cfg.keep_checkpoints is None or cfg.best_metric is None):
        return
    try:
        listed = [(p, read_meta(p)) for p in find_checkpoints(run_dir)]
        keep_best(run_dir, listed, new, cfg)
        in_use = {m.hierarchy_version for _, m in listed} | {new.hierarchy_version}
        prune_snapshots(run_dir, cfg.keep_snapshots, in_use)
    except Exception as e:  # noqa: BLE001 - retention must not cost an epoch
        log.warning("checkpoint/snapshot retention skipped this epoch: %s", e)
