"""Driver of a sweep: Optuna search + ASHA on Ray Tune, persisted and resumable.

Sweep folder ``storage.path/storage.name`` (names: :class:`hirl_ray.runs.RunLayout`):
``sweep.json`` (base experiment, tune section, data size: what resume/report/dashboard read),
``optuna.db`` (the Optuna study, SQLite by default; see ``tune.storage.url``), ``tune/`` (Ray
Tune's restorable experiment, TensorBoard event files per trial), ``trials/<id>/`` (each
trial's HIRL run folder) and ``results.csv`` (one row per trial, written at the end, also
after a resume).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from hirl_ray.config import ConfigError, from_dict
from hirl_ray.logs import get_logger
from hirl_ray.resources import ray_given, resource_bundles
from hirl_ray.runs import LAYOUT
from hirl_ray.sweep.sampling import (
    DefineByRun,
    Params,
    fixed_overrides,
    grid_points,
    sizes_from_params,
)
from hirl_ray.sweep.space import TuneConfig
from hirl_ray.sweep.trial import FreeStoppedTrials, run_trial
from hirl_ray.train import ray_compat
from hirl_ray.train.checkpoint import latest_checkpoint, read_meta
from hirl_ray.train.ray_cluster import connect

log = get_logger(__name__)


def init_ray_for_sweep() -> str | None:
    """Join ``RAY_ADDRESS`` or start a local Ray with the dashboard; returns the dashboard URL.

    By address either way (``train/ray_cluster.py``): a cluster someone else started on this
    machine with ``ray start`` is never joined by accident.
    """
    dashboard = os.environ.get("HIRL_RAY_DASHBOARD", "1") == "1"
    ctx = connect(dashboard=dashboard, dashboard_host="127.0.0.1")
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url else None


def optuna_storage(spec: TuneConfig, sweep_dir: Path) -> Any:
    """SQLite ``<sweep>/optuna.db`` by default; an RDB URL; or ``journal:<file>`` (many nodes).

    Explicit storage so optuna-dashboard can read the study (ray #48500 / PR #48547).
    """
    import optuna

    url = spec.storage.url or f"sqlite:///{LAYOUT.optuna_file(sweep_dir)}"
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
    return optuna.storages.RDBStorage(url)


def study_name(spec: TuneConfig, sweep_dir: Path) -> str:
    return spec.storage.study_name or sweep_dir.name


def _searcher(spec: TuneConfig, params: Params, sweep_dir: Path) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    se = spec.searcher
    if se.name == "random":
        sampler: Any = optuna.samplers.RandomSampler(seed=se.seed)
    else:
        # constant_liar: with concurrent trials, pending ones count as bad so TPE spreads out.
        sampler = optuna.samplers.TPESampler(seed=se.seed, n_startup_trials=se.n_startup_trials,
                                             constant_liar=spec.max_concurrent_trials > 1)
    metric = list(spec.metrics) if spec.multi_objective else spec.primary_metric
    mode = list(spec.modes) if spec.multi_objective else spec.primary_mode
    return OptunaSearch(space=DefineByRun(spec, params), metric=metric, mode=mode, sampler=sampler,
                        study_name=study_name(spec, sweep_dir),
                        storage=optuna_storage(spec, sweep_dir))


def _scheduler(spec: TuneConfig, epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler.name == "fifo":
        return FIFOScheduler()
    # time_attr="epoch" (our completed-epoch count), not Tune's iteration counter, which
    # restarts at 1 when a restored trial resumes from its own checkpoint.
    return ASHAScheduler(time_attr="epoch", metric=spec.primary_metric, mode=spec.primary_mode,
                         max_t=epochs,
                         grace_period=spec.scheduler.grace_period,
                         reduction_factor=spec.scheduler.reduction_factor)


def _trainable(spec: TuneConfig, sweep_dir: Path, base: dict[str, Any], num_samples: int) -> Any:
    fn = tune.with_parameters(run_trial, base=base, spec=spec, sweep_dir=str(sweep_dir),
                              num_samples=num_samples)
    # The trial function itself only waits on its Train run: it reserves no CPU (Tune needs a
    # non-empty request, hence a little memory); the Train workers reserve their own CPUs/GPUs.
    return tune.with_resources(fn, {"CPU": 0, "memory": 64 * 1024 ** 2})


def run_sweep(spec: TuneConfig, params: Params, sweep_dir: Path, base: dict[str, Any],
              num_samples: int, resume: bool = False) -> tuple[Any, bool]:
    """Run (or restore and finish) the sweep; returns Tune's ResultGrid and "interrupted".

    ``params``: :func:`hirl_ray.sweep.sampling.search_params` of ``spec``.
    """
    given = ray_given()  # before init: after it, Ray is always initialized
    url = init_ray_for_sweep()
    if url:
        log.info("Ray dashboard: %s", url)
    if given:  # one trial must fit on the cluster we joined (a local Ray was checked before)
        from hirl_ray.train.ray_fit import wait_for_resources

        trial = from_dict(base, fixed_overrides(spec, str(sweep_dir), "check",
                                                from_dict(base).eval.protocols))
        wait_for_resources(resource_bundles(trial), trial.train.resource_timeout_s)
    experiment = LAYOUT.tune_dir(sweep_dir)
    trainable = _trainable(spec, sweep_dir, base, num_samples)
    callbacks = [FreeStoppedTrials(str(sweep_dir))]
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise ConfigError(f"nothing to resume in {sweep_dir}: no Tune experiment there; "
                              "run without --resume to start the sweep")
        # The searcher (and its Optuna study handle) comes back from the experiment state
        # (ray #30861); finished trials are kept, unfinished ones continue in their folders.
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        if search_alg_grid := spec.searcher.name == "grid":
            param_space: dict[str, Any] = {
                "grid_point": tune.grid_search(grid_points(spec, params))}
        else:
            param_space = {}
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(
                search_alg=None if search_alg_grid else _searcher(spec, params, sweep_dir),
                scheduler=_scheduler(spec, base["train"]["epochs"]),
                num_samples=1 if search_alg_grid else spec.num_trials,
                max_concurrent_trials=spec.max_concurrent_trials, reuse_actors=False),
            run_config=tune.RunConfig(name=LAYOUT.tune, storage_path=str(sweep_dir),
                                      callbacks=callbacks, verbose=1))
    grid = tuner.fit()
    trials = ray_compat.experiment_analysis(grid).trials  # Tune's Trials carry the status
    expected = len(grid_points(spec, params)) if spec.searcher.name == "grid" \
        else spec.num_trials
    done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    return grid, done < expected


def epochs_trained(run_dir: Path) -> int:
    """Completed epochs of a trial: its newest checkpoint's (older ones may be deleted,
    ``storage.keep_checkpoints``)."""
    newest = latest_checkpoint(run_dir)
    return read_meta(newest).epoch if newest is not None else 0


def results_table(sweep_dir: Path, spec: TuneConfig, epochs: int) -> pd.DataFrame:
    """One row per trial from the trial folders and Tune's per-trial ``result.json``.

    ``epochs_trained`` is the newest checkpoint's epoch: the compute a trial really used (a
    trial ASHA stopped may have finished one more epoch than Tune saw).
    """
    rows = []
    for trial_dir in sorted(LAYOUT.tune_dir(sweep_dir).glob("*/")):
        result_file = trial_dir / "result.json"  # Tune's own files in its trial folder
        params_file = trial_dir / "params.json"
        if not result_file.is_file() or not params_file.is_file():
            continue
        params = json.loads(params_file.read_text())
        lines = [json.loads(x) for x in result_file.read_text().splitlines() if x.strip()]
        if not lines:
            continue
        last, trial_id = lines[-1], lines[-1]["trial_id"]
        run_dir = LAYOUT.trial_dir(sweep_dir, trial_id)
        params = params.get("grid_point", params)
        row = {"trial_id": trial_id, "depth": int(params["depth"]),
               "level0_clusters": int(params["level0_clusters"]),
               "num_clusters": "/".join(map(str, sizes_from_params(params))),
               **{k: params[k] for k in spec.space.params},
               "epochs_trained": epochs_trained(run_dir),
               "epochs_reported": int(last.get("epoch", 0)),
               "time_total_s": float(sum(x.get("time_this_iter_s", 0.0) for x in lines)),
               "checkpoint": str(latest_checkpoint(run_dir) or "")}
        for level, k in enumerate(sizes_from_params(params)):
            row[f"K_{level}"] = k
        row.update({k: v for k, v in last.items() if "/" in k and isinstance(v, (int, float))})
        row["stopped_early"] = row["epochs_reported"] < epochs
        # Unix seconds of the trial's first and last report (its first epoch done / its end).
        row["started"] = lines[0].get("timestamp", 0)
        row["finished"] = last.get("timestamp", 0)
        rows.append(row)
    return pd.DataFrame(rows).sort_values("started").reset_index(drop=True) if rows \
        else pd.DataFrame()


def pick_best(table: pd.DataFrame, spec: TuneConfig) -> pd.Series:
    """Best trial on the first metric (among the Pareto front when multi-objective)."""
    ok = table.dropna(subset=list(spec.metrics))
    if ok.empty:
        raise RuntimeError(f"no trial reported {list(spec.metrics)}; see "
                           f"{LAYOUT.tune}/*/error.txt")
    ascending = spec.primary_mode == "min"
    return ok.sort_values([spec.primary_metric, "epochs_trained"],
                          ascending=[ascending, False]).iloc[0]


def pareto_front(table: pd.DataFrame, spec: TuneConfig) -> pd.DataFrame:
    """Trials not dominated on ``spec.metrics`` (signs follow ``spec.modes``)."""
    vals = table[list(spec.metrics)].to_numpy(dtype=float)
    signs = [1.0 if m == "max" else -1.0 for m in spec.modes]
    v = vals * signs
    keep = [not any((v[j] >= v[i]).all() and (v[j] > v[i]).any() for j in range(len(v)))
            for i in range(len(v))]
    return table[keep]
