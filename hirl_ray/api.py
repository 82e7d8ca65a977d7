"""Public Python API: ``hirl_ray.fit``, ``hirl_ray.tune`` and ``hirl_ray.load_backbone``."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hirl_ray import storage
from hirl_ray.config import ConfigError, ExperimentConfig, load_config
from hirl_ray.hierarchy.faiss_build import check_faiss_install
from hirl_ray.hierarchy.memory import (
    RebuildMemory,
    check_rebuild_memory,
    node_memory_bytes,
    rebuild_estimate,
)
from hirl_ray.eval.checkpoint import load_backbone

__all__ = ["FitResult", "TuneResult", "fit", "load_backbone", "prepare_run", "tune"]

# Keys that change the network or the hierarchy's shape: a run folder trained with other
# values cannot be resumed with these, so we refuse before touching it.
_RESUME_KEYS = (("model", "backbone"), ("model", "width"), ("model", "small_stem"),
                ("method", "name"), ("hirl", "enabled"), ("hirl", "num_clusters"), ("data", "name"),
                ("data", "image_size"),
                ("hirl", "embedding"))  # sets the heads' width (runs before it had none: refused)


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`fit`.

    metrics: final evaluation (``knn_acc/<level>``, ``nmi/<level>``, …) and the last
    epoch's training metrics (``train/…``); checkpoint_path: the final checkpoint folder
    (give it to :func:`load_backbone`); hierarchy_path: newest prototype snapshot.
    """

    metrics: dict[str, Any]
    checkpoint_path: str
    hierarchy_path: str | None
    run_dir: str


def _check_data(cfg: ExperimentConfig) -> int:
    """Count the train split (an S3 image folder by listing it) to check sizes against it."""
    from hirl_ray.data import dataset_size

    n = dataset_size(cfg.data, "train")
    if cfg.train.batch_size > n:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {n} training "
                          f"samples of data.name={cfg.data.name!r}; lower it")
    if cfg.hirl.enabled and cfg.hirl.num_clusters[0] > n:
        raise ConfigError(f"hirl.num_clusters[0]={cfg.hirl.num_clusters[0]} exceeds the {n} "
                          f"training samples of data.name={cfg.data.name!r}; lower it")
    if cfg.hirl.enabled and not os.environ.get("RAY_ADDRESS"):
        # Local Ray: the prototype actor runs on this machine. When joining a cluster we cannot
        # know its node yet; train_on_ray checks there once the actor is placed.
        warning = check_rebuild_memory(rebuild_memory(cfg, n), node_memory_bytes(),
                                       "this machine (local Ray)")
        if warning:
            print(f"[hirl_ray] warning: {warning}", file=sys.stderr, flush=True)
    return n


def rebuild_memory(cfg: ExperimentConfig, num_samples: int) -> RebuildMemory:
    """Peak memory of one hierarchy rebuild in the prototype actor for this experiment."""
    return rebuild_estimate(num_samples, _feature_dim(cfg), cfg.hirl.num_clusters,
                            num_shards=cfg.train.num_workers)


def _feature_dim(cfg: ExperimentConfig) -> int:
    """Width of the clustered features (``hirl.embedding``), from a weightless (meta) build."""
    import torch

    from hirl_ray.methods import build_method

    with torch.device("meta"):
        return build_method(cfg).embedding_dim(cfg.hirl.embedding)


def prepare_run(cfg: ExperimentConfig) -> str:
    """Check the run folder (local or ``s3://``) is writable and compatible; save the config.

    Refuses to resume a run trained with an incompatible config, before touching it.
    """
    run_dir = storage.resolve(cfg.run_dir)
    saved = storage.join(run_dir, "config.yaml")
    if storage.exists(saved):
        old = yaml.safe_load(storage.read_text(saved)) or {}
        new = cfg.to_dict()
        method_keys = tuple(("method", k) for k in cfg.method.shape_keys)
        for section, key in (*_RESUME_KEYS, *method_keys):
            a, b = old.get(section, {}).get(key), new[section][key]
            if a != b:
                raise ConfigError(
                    f"{section}.{key}={b!r} differs from {a!r} used by the existing run in "
                    f"{run_dir}; set storage.name to a new folder to start a new run")
    else:
        try:
            storage.check_writable(run_dir)
        except PermissionError as e:
            raise ConfigError(str(e)) from None
    storage.write_text(saved, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def fit(config_or_path: str | Path | Mapping[str, Any] | ExperimentConfig | None = None,
        overrides: Mapping[str, Any] | Iterable[str] | None = None) -> FitResult:
    """Pretrain with HIRL on Ray Train and evaluate the result.

    Args:
        config_or_path: an experiment YAML path, a nested dict, an ``ExperimentConfig``,
            or ``None`` for the embedded default experiment.
        overrides: ``{"train.epochs": 5}`` or ``["train.epochs=5", ...]``.

    A run folder ``storage.path/storage.name`` that already holds checkpoints is resumed
    from its newest one; nothing in it is deleted.
    """
    cfg = load_config(config_or_path, overrides)
    check_faiss_install()
    num_samples = _check_data(cfg)  # every check above happens before Ray starts
    run_dir = prepare_run(cfg)
    from hirl_ray.train.ray_fit import run_fit  # imports Ray

    need = rebuild_memory(cfg, num_samples) if cfg.hirl.enabled else None
    out = run_fit(cfg, run_dir, num_samples, rebuild_memory=need)
    return FitResult(metrics=out.metrics, checkpoint_path=out.checkpoint_path,
                     hierarchy_path=out.hierarchy_path, run_dir=out.run_dir)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Human summary of the final metrics (grouped per label level)."""
    lines = []
    for key in sorted(metrics):
        if key.startswith(("knn_acc/", "nmi/", "ari/", "acc/", "hierarchy/")):
            value = metrics[key]
            lines.append(f"  {key:<34} {value:.4f}" if isinstance(value, float)
                         else f"  {key:<34} {value}")
    return "\n".join(lines)


@dataclass(frozen=True)
class TuneResult:
    """Outcome of :func:`tune`.

    best_config: the best trial's sampled values (``depth``, ``level0_clusters``, ``shrink_l``,
    searched keys) and the resulting ``num_clusters``; best_metrics: its last reported metrics;
    best_checkpoint: its newest checkpoint (give it to :func:`load_backbone`); results: a pandas
    DataFrame, one row per trial (also ``<sweep_dir>/results.csv``); pareto_front: the
    non-dominated rows when several metrics are optimised; interrupted: the sweep stopped before
    all trials finished (continue it with ``resume=True``).
    """

    best_config: dict[str, Any]
    best_metrics: dict[str, Any]
    best_checkpoint: str
    results: Any  # pandas.DataFrame
    sweep_dir: str
    interrupted: bool
    pareto_front: Any = None


def tune(config_or_path: str | Path | Mapping[str, Any] | ExperimentConfig,
         overrides: Mapping[str, Any] | Iterable[str] | None = None,
         resume: bool = False) -> TuneResult:
    """Search hierarchy depth, cluster sizes (and more) with Optuna + ASHA on Ray Tune.

    Args:
        config_or_path: an experiment with a ``tune:`` section (YAML path, dict or config), or
            an existing sweep folder (with ``resume=True``).
        overrides: ``{"tune.num_trials": 4}`` or ``["train.epochs=6", ...]``.
        resume: continue the interrupted sweep in ``storage.path/storage.name``: finished
            trials are kept, unfinished ones continue from their newest checkpoint.

    Everything (config, search space, data size, sweep folder) is checked before Ray starts.
    """
    from hirl_ray.sweep.sweep import execute, plan_sweep

    check_faiss_install()
    plan = plan_sweep(config_or_path, overrides, resume)
    return TuneResult(**execute(plan))
