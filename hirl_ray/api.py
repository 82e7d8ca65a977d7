"""Public Python API: ``hirl_ray.fit``, ``hirl_ray.tune`` and ``hirl_ray.load_backbone``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hirl_ray.config import ExperimentConfig, load_config
from hirl_ray.eval.checkpoint import load_backbone
from hirl_ray.hierarchy.faiss_build import check_faiss_install
from hirl_ray.logs import console
from hirl_ray.runs import FitResult, check_data, prepare_run, rebuild_memory

__all__ = ["FitResult", "TuneResult", "fit", "load_backbone", "prepare_run", "tune"]


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
    console()
    cfg = load_config(config_or_path, overrides)
    check_faiss_install()
    num_samples = check_data(cfg)  # every check above happens before Ray starts
    run_dir = prepare_run(cfg)
    from hirl_ray.train.ray_fit import run_fit  # imports Ray

    need = rebuild_memory(cfg, num_samples) if cfg.hirl.enabled else None
    return run_fit(cfg, run_dir, num_samples, rebuild_memory=need)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Human summary of the final metrics (grouped per label level)."""
    from hirl_ray.eval.protocol import metric_prefixes

    prefixes = tuple(f"{p}/" for p in metric_prefixes())
    lines = []
    for key in sorted(metrics):
        if key.startswith(prefixes):
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

    console()
    check_faiss_install()
    plan = plan_sweep(config_or_path, overrides, resume)
    return TuneResult(**execute(plan))
