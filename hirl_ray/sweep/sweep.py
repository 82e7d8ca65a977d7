"""``hirl_ray.tune()`` end to end: validate everything, then search, then summarise.

:func:`plan_sweep` does every check (config, ``tune:`` space, data size, label levels, sweep
folder) without importing Ray; :func:`execute` runs or resumes the sweep and builds the
:class:`~hirl_ray.api.TuneResult` fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hirl_ray import storage
from hirl_ray.config import ConfigError, ExperimentConfig, from_dict, load_config
from hirl_ray.logs import is_redacted, redact
from hirl_ray.resources import check_local_resources
from hirl_ray.runs import LAYOUT, inspect_data
from hirl_ray.sweep.sampling import (
    Params,
    check_against,
    fixed_overrides,
    search_params,
    sizes_from_params,
)
from hirl_ray.sweep.space import TUNE_SECTION, TuneConfig, tune_spec
from hirl_ray.train.mlflow_log import check_mlflow
from hirl_ray.train.wandb_log import check_wandb

#: The keys that set one trial's resources (named when this machine cannot meet them).
TRIAL_RESOURCE_KEYS = {"workers": "tune.resources.workers_per_trial",
                       "cpus": "tune.resources.cpus_per_worker",
                       "gpus": "tune.resources.gpus_per_worker",
                       "no_gpu": "tune.resources.gpus_per_worker=0"}


@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep, ready to run. ``params``: the searched keys' distributions."""

    cfg: ExperimentConfig
    spec: TuneConfig
    params: Params
    sweep_dir: Path
    num_samples: int
    level_names: tuple[str, ...]
    resume: bool


def load_sweep(sweep_dir: str | Path) -> tuple[ExperimentConfig, TuneConfig, dict[str, Any]]:
    """Base experiment, spec and saved facts of an existing sweep folder."""
    path = LAYOUT.sweep_file(sweep_dir)
    if not path.is_file():
        raise ConfigError(f"{sweep_dir} is not a sweep folder (no {LAYOUT.sweep}); pass the "
                          "folder hirl-ray tune wrote (storage.path/storage.name)")
    saved = json.loads(path.read_text())
    cfg = from_dict(saved["config"], source=str(path))
    return cfg, tune_spec(cfg), saved


def plan_sweep(config_or_path: Any, overrides: Mapping[str, Any] | Iterable[str] | None = None,
               resume: bool = False) -> SweepPlan:
    """Every check of a sweep, before Ray starts (raises one-line ``ConfigError``).

    Label level names come from :func:`~hirl_ray.runs.inspect_data`: for an image folder on
    ``s3://`` they are fixed, so nothing is downloaded on the driver; the splits are only
    listed.
    """
    if isinstance(config_or_path, (str, Path)) and Path(config_or_path).is_dir():
        cfg, _, _ = load_sweep(config_or_path)  # resume from the sweep folder itself
        cfg = load_config(cfg, overrides) if overrides else cfg
    else:
        cfg = load_config(config_or_path, overrides)
    if storage.is_remote(cfg.storage.path):
        raise ConfigError(f"storage.path={cfg.storage.path}: sweeps write to a local folder "
                          f"only (no {storage.scheme(cfg.storage.path)}:// yet); use a local "
                          "path (each trial's checkpoints go under it)")
    spec = tune_spec(cfg)
    if resume and is_redacted(spec.storage.url or ""):  # sweep.json keeps no password
        raise ConfigError(f"tune.storage.url was saved redacted ({spec.storage.url}); pass it "
                          f"again: hirl-ray tune --resume {config_or_path} tune.storage.url=...")
    if not cfg.hirl.enabled:
        raise ConfigError("hirl.enabled must be true for a hierarchy sweep")
    params = search_params(spec, cfg)
    facts = inspect_data(cfg)
    num_samples, level_names = facts.num_samples, facts.level_names
    check_against(spec, params, cfg, num_samples, level_names, facts.classes)
    check_local_resources(load_config(cfg, fixed_overrides(spec, cfg.storage.path, "check",
                                                          cfg.eval.protocols)),
                          TRIAL_RESOURCE_KEYS)
    check_mlflow(cfg)  # observe.mlflow: one MLflow run per trial
    check_wandb(cfg)  # observe.wandb: one W&B run per trial
    sweep_dir = Path(storage.resolve(cfg.run_dir))
    started = LAYOUT.tune_dir(sweep_dir).exists()
    if resume and not started:
        raise ConfigError(f"nothing to resume in {sweep_dir}; run without --resume to start")
    if not resume and started:
        raise ConfigError(f"{sweep_dir} already holds a sweep; pass --resume (resume=True) to "
                          "continue it, or set storage.name to a new folder")
    if resume:
        saved = json.loads(LAYOUT.sweep_file(sweep_dir).read_text())
        # sweep.json holds the section with secrets redacted: compare it that way.
        if saved["config"].get(TUNE_SECTION) != redact(cfg.to_dict()).get(TUNE_SECTION):
            raise ConfigError(f"the tune: section differs from the one {sweep_dir} was started "
                              "with; resume with the same file, or start a new storage.name")
    return SweepPlan(cfg, spec, params, sweep_dir, num_samples, level_names, resume)


def write_sweep_file(plan: SweepPlan) -> Path:
    """``sweep.json``: the base experiment (secrets redacted), data size and label levels."""
    path = LAYOUT.sweep_file(plan.sweep_dir)
    path.write_text(json.dumps(redact({"config": plan.cfg.to_dict(),
                                       "num_samples": plan.num_samples,
                                       "level_names": list(plan.level_names)}), indent=2))
    return path


def execute(plan: SweepPlan) -> dict[str, Any]:
    """Run or resume the sweep; the fields of :class:`hirl_ray.api.TuneResult`."""
    from hirl_ray.sweep.search import pareto_front, pick_best, results_table, run_sweep

    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    if not plan.resume:
        write_sweep_file(plan)
    base = {k: v for k, v in plan.cfg.to_dict().items() if k != TUNE_SECTION}
    _, interrupted = run_sweep(plan.spec, plan.params, plan.sweep_dir, base, plan.num_samples,
                               plan.resume)
    table = results_table(plan.sweep_dir, plan.spec, plan.cfg.train.epochs)
    if table.empty:
        raise RuntimeError(f"no trial of {plan.sweep_dir} reported a result; see "
                           f"{LAYOUT.tune_dir(plan.sweep_dir)}/*/error.txt")
    table.to_csv(LAYOUT.results_file(plan.sweep_dir), index=False)
    best = pick_best(table, plan.spec)
    trial_dir = LAYOUT.trial_dir(plan.sweep_dir, best["trial_id"])
    params = json.loads(Path(LAYOUT.params_file(trial_dir)).read_text())
    params = params.get("grid_point", params)
    params["num_clusters"] = list(sizes_from_params(params))
    metrics = {k: best[k] for k in table.columns if "/" in k or k in ("epochs_trained",
                                                                       "time_total_s")}
    front = pareto_front(table.dropna(subset=list(plan.spec.metrics)), plan.spec) \
        if plan.spec.multi_objective else None
    return {"best_config": params, "best_metrics": metrics,
            "best_checkpoint": str(best["checkpoint"]), "results": table,
            "sweep_dir": str(plan.sweep_dir), "interrupted": interrupted,
            "pareto_front": front}
