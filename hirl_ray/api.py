"""Public Python API: ``hirl_ray.fit``, ``hirl_ray.evaluate``, ``hirl_ray.tune`` and
``hirl_ray.load_backbone``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hirl_ray.config import DataConfig, ExperimentConfig, load_config
from hirl_ray.eval.checkpoint import CheckpointEvaluation, load_backbone, run_checkpoint_evaluation
from hirl_ray.hierarchy.faiss_build import check_faiss_install
from hirl_ray.logs import console, get_logger
from hirl_ray.resources import check_local_resources
from hirl_ray.runs import LAYOUT, FitResult, check_data, prepare_run, rebuild_memory
from hirl_ray.train.checkpoint import newest_checkpoint_config
from hirl_ray.train.interrupt import Interrupted
from hirl_ray.train.mlflow_log import check_mlflow
from hirl_ray.train.wandb_log import check_wandb

__all__ = ["FitResult", "Interrupted", "TuneResult", "evaluate", "fit", "load_backbone",
           "prepare_run", "tune"]

log = get_logger(__name__)


def fit(config_or_path: str | Path | Mapping[str, Any] | ExperimentConfig | None = None,
        overrides: Mapping[str, Any] | Iterable[str] | None = None) -> FitResult:
    """Pretrain with HIRL on Ray Train and evaluate the result.

    Args:
        config_or_path: an experiment YAML path, a nested dict, an ``ExperimentConfig``,
            or ``None`` for the embedded default experiment.
        overrides: ``{"train.epochs": 5}`` or ``["train.epochs=5", ...]``.

    A run folder ``storage.path/storage.name`` that already holds checkpoints is resumed
    from its newest good one (a run trained with an incompatible config is refused); only
    checkpoints and snapshots beyond ``storage.keep_*`` are deleted.

    Raises:
        Interrupted: SIGINT/SIGTERM stopped training after saving the current epoch; the
            same call resumes.
    """
    console()
    cfg = load_config(config_or_path, overrides)
    check_faiss_install()
    num_samples = check_data(cfg)  # every check up to prepare_run happens before Ray starts
    check_local_resources(cfg)
    check_mlflow(cfg)  # observe.mlflow: installed, the server answers
    check_wandb(cfg)  # observe.wandb: installed, an API key unless offline
    run_dir = prepare_run(cfg, newest_checkpoint_config)
    from hirl_ray.train.ray_fit import run_fit  # imports Ray

    need = rebuild_memory(cfg, num_samples) if cfg.hirl.enabled else None
    return run_fit(cfg, run_dir, num_samples, rebuild_memory=need)


def evaluate(checkpoint: str | Path,
             data: Mapping[str, Any] | DataConfig | None = None,
             protocols: str | Sequence[str] | None = None,
             overrides: Mapping[str, Any] | Iterable[str] | None = None,
             device: str = "cpu",
             plots: str | Path | None = None) -> dict[str, float]:
    """Evaluate a trained backbone with the evaluation protocols (no Ray).

    Args:
        checkpoint: A checkpoint folder or a run folder (its newest checkpoint); local or
            ``s3://``.
        data: A ``data:`` mapping or :class:`~hirl_ray.config.DataConfig` to evaluate on
            another dataset (default: the run's). A mapping that names another dataset starts
            from the defaults but keeps the run's ``image_size``; one without ``name`` changes
            only the keys it gives.
        protocols: Names in ``eval.protocols`` order (default: the run's ``eval.protocols``).
        overrides: Protocol settings, ``{"eval.params.knn.k": 10}`` or ``["knn.k=10"]``.
        device: Where the backbone runs (``"cpu"``, ``"cuda"``).
        plots: A folder to write PNGs to: 2-D embeddings (PCA, t-SNE) of the test features
            coloured per label level, per-level clustering and accuracy bars, and the run's
            prototype tree when it has one.

    Returns:
        Flat ``{key: value}`` metrics of every protocol (``knn_acc/<level>``, ``nmi/<level>``,
        …), the keys of a fit's ``metrics.json``.

    Features of both splits are extracted once and shared by all protocols; the run's
    prototype hierarchy (``consistency``) is used when evaluating on the run's own data.
    """
    return evaluate_run(checkpoint, data, protocols, overrides, device, plots)[0].flat_metrics


def evaluate_run(checkpoint: str | Path,
                 data: Mapping[str, Any] | DataConfig | None = None,
                 protocols: str | Sequence[str] | None = None,
                 overrides: Mapping[str, Any] | Iterable[str] | None = None,
                 device: str = "cpu",
                 plots: str | Path | None = None) -> tuple[CheckpointEvaluation, list[Path]]:
    """:func:`evaluate`, returning the whole evaluation (metrics per protocol, config, inputs)
    and the plot files written (what ``hirl-ray eval`` prints)."""
    from hirl_ray.eval.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    run_dir = LAYOUT.run_of_checkpoint(path)
    hierarchy_dir = LAYOUT.hierarchy_dir(run_dir) if run_dir else None
    result = run_checkpoint_evaluation(path, data, protocols, overrides, device=device,
                                       hierarchy_dir=hierarchy_dir)
    written: list[Path] = []
    if plots is not None:
        from hirl_ray.eval.plots import write_plots

        written = write_plots(result.inputs, result.flat_metrics, plots,
                              title=result.config.data.name)
        if run_dir is not None:
            from hirl_ray.sweep.tree import prototype_tree  # matplotlib; no Ray

            tree = prototype_tree(run_dir, path, Path(plots) / "prototype_tree.png")
            written += [tree] if tree is not None else []
    return result, written


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Human summary of the final metrics (grouped per label level)."""
    lines = []
    for key in sorted(metrics):
        if "/" in key and not key.startswith(("train/", "data/")):  # protocols' <prefix>/<...>
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
