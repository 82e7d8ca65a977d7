"""From a :class:`TuneConfig` to trials: hierarchy sizes, Optuna define-by-run, grid, overrides.

No Ray here; Optuna is only touched through the ``trial`` object handed to
:class:`DefineByRun`, so the maths of the space is testable without either.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hirl_ray.config import SECTIONS, ConfigError, ExperimentConfig, load_config
from hirl_ray.eval.protocol import level_metric_prefixes
from hirl_ray.runs import LAYOUT
from hirl_ray.sweep.space import (
    LABEL_FREE_METRIC,
    LABEL_FREE_METRICS,
    WALL_TIME_METRIC,
    Choice,
    Dist,
    TuneConfig,
)

#: ``tune.space.params`` entries resolved against the experiment: ``(config key, distribution)``.
Params = tuple[tuple[str, Dist], ...]
# Keys the search may not touch: they are set by the sweep itself (shape, resources, eval).
RESERVED = frozenset({
    "hirl.num_clusters", "hirl.enabled", "train.num_workers", "train.use_gpu",
    "train.cpus_per_worker", "train.gpus_per_worker", "train.epochs", "train.max_failures"})
# Sections whose keys are never searched (where data and results live).
_UNSEARCHABLE = ("data", "storage")


def cluster_sizes(depth: int, level0: int, shrink: Sequence[float]) -> tuple[int, ...]:
    """``(K_0, ..., K_{depth-1})`` from the level-0 size and per-level shrink ratios.

    ``K_l = round(r_l * K_{l-1})`` clamped to ``[depth - l + 1, K_{l-1} - 1]``: strictly
    decreasing (HIRL's levels cluster the centroids below, so ``K_l < K_{l-1}``) and with
    room for every remaining level to keep >= 2 clusters. Needs ``level0 >= depth + 1``,
    which :class:`hirl_ray.sweep.space.HierarchySpace` guarantees for the whole space.
    """
    if level0 < depth + 1 and depth > 1:
        raise ValueError(f"level0={level0} leaves no room for {depth} decreasing levels")
    sizes = [int(level0)]
    for level in range(1, depth):
        want = int(round(float(shrink[level - 1]) * sizes[-1]))
        sizes.append(min(sizes[-1] - 1, max(depth - level + 1, want)))
    return tuple(sizes)


def shrink_name(level: int) -> str:
    """Optuna parameter name of the level-``level`` shrink ratio (``level >= 1``)."""
    return f"shrink_{level}"


def sizes_from_params(params: Mapping[str, Any]) -> tuple[int, ...]:
    """Cluster sizes of a sampled trial (``depth``, ``level0_clusters``, ``shrink_l``)."""
    depth = int(params["depth"])
    return cluster_sizes(depth, int(params["level0_clusters"]),
                         [float(params[shrink_name(lv)]) for lv in range(1, depth)])


def search_params(spec: TuneConfig, cfg: ExperimentConfig) -> Params:
    """Each ``tune.space.params`` entry as the distribution of the config key it sets.

    The key must name a field of a searchable section's dataclass (for ``method.*``, the
    chosen method's ``Config``); a range is integer exactly when that field is an ``int``.
    """
    out = []
    for key, param in spec.space.params.items():
        where = f"tune.space.params.{key}"
        section, _, name = key.partition(".")
        fields: dict[str, Any] = {}
        if section in SECTIONS and section not in _UNSEARCHABLE:
            cls = type(getattr(cfg, section))
            hints = typing.get_type_hints(cls)
            fields = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
        if name not in fields or key in RESERVED:
            raise ConfigError(f"{where}: not a searchable key; search section.key of model, "
                              "method, hirl, train or eval (depth/cluster sizes go in "
                              "tune.space.depth/level0_clusters/shrink)")
        kind = fields[name]
        if param.choices is None and kind not in (int, float):
            raise ConfigError(f"{where}: {key} is not numeric; give {{choices: [...]}}")
        out.append((key, param.dist(where, is_int=kind is int)))
    return tuple(out)


def _suggest(trial: Any, name: str, dist: Dist) -> Any:
    if isinstance(dist, Choice):
        return trial.suggest_categorical(name, list(dist.values))
    if dist.is_int:
        return trial.suggest_int(name, int(dist.min), int(dist.max), log=dist.log)
    return trial.suggest_float(name, float(dist.min), float(dist.max), log=dist.log)


class DefineByRun:
    """Optuna define-by-run space: depth first, then only the shrink ratios that depth uses.

    Conditional on depth (Optuna's define-by-run style): a depth-2 trial never samples
    ``shrink_2``, so TPE does not learn from values that had no effect. Picklable (the
    searcher is saved in Tune's experiment state and must survive ``Tuner.restore``).
    ``params``: :func:`search_params` of the sweep.
    """

    def __init__(self, spec: TuneConfig, params: Params) -> None:
        self.spec = spec
        self.params = params

    def __call__(self, trial: Any) -> dict[str, Any]:
        s = self.spec.space
        depth = _suggest(trial, "depth", s.depth)
        level0 = _suggest(trial, "level0_clusters", s.level0_clusters)
        ratios = [_suggest(trial, shrink_name(lv), s.shrink) for lv in range(1, depth)]
        for key, dist in self.params:
            _suggest(trial, key, dist)
        # Constant, derived values go into Tune's config (results table) but not into Optuna.
        return {"num_clusters": list(cluster_sizes(depth, level0, ratios))}


def _axis(dist: Dist, n: int) -> list[Any]:
    if isinstance(dist, Choice):
        return list(dist.values)
    if dist.log:
        vals = np.exp(np.linspace(math.log(dist.min), math.log(dist.max), n))
    else:
        vals = np.linspace(dist.min, dist.max, n)
    if dist.is_int:
        return sorted({int(round(v)) for v in vals})
    return [float(v) for v in vals]


def grid_points(spec: TuneConfig, params: Params) -> list[dict[str, Any]]:
    """Every point of the full grid over the same space (``searcher.grid_points`` per axis).

    One shared shrink ratio per grid point (``shrink_l`` equal for all levels) keeps the grid
    the same size for every depth; used by the grid baseline of the benchmark.
    """
    s, n = spec.space, spec.searcher.grid_points
    axes = [_axis(s.depth, s.depth.max - s.depth.min + 1 if s.depth.is_int else n),
            _axis(s.level0_clusters, n), _axis(s.shrink, n),
            *[_axis(d, n) for _, d in params]]
    out = []
    for depth, k0, r, *rest in itertools.product(*axes):
        point: dict[str, Any] = {"depth": depth, "level0_clusters": k0}
        point.update({shrink_name(lv): r for lv in range(1, depth)})
        point.update({k: v for (k, _), v in zip(params, rest, strict=True)})
        point["num_clusters"] = list(sizes_from_params(point))
        out.append(point)
    # Depth 1 has no shrink ratio: drop the duplicates the shrink axis created.
    unique = {repr(sorted((k, v) for k, v in p.items() if k != "num_clusters")): p for p in out}
    return list(unique.values())


def fixed_overrides(spec: TuneConfig, sweep_dir: str, trial_id: str,
                    protocols: Sequence[str]) -> dict[str, Any]:
    """Overrides every trial gets: its own run folder, resources, per-epoch evaluation.

    ``eval.every_epochs=1`` because ASHA needs the metric after every epoch; ``protocols``
    (the base experiment's ``eval.protocols``) gain ``label_free``, so every trial reports
    every label-free criterion, whichever metric the sweep optimises (the report ranks them).
    A trial that keeps only its last checkpoints (``storage.keep_checkpoints``) also keeps its
    best one by the sweep's first metric.
    """
    r = spec.resources
    best = ({"storage.best_metric": spec.primary_metric, "storage.best_mode": spec.primary_mode}
            if spec.primary_metric != WALL_TIME_METRIC else {})
    return {**best,"eval.protocols": list(dict.fromkeys((*protocols, "label_free"))),
            "storage.path": str(LAYOUT.trials_dir(sweep_dir)), "storage.name": trial_id,
            "train.num_workers": r.workers_per_trial, "train.cpus_per_worker": r.cpus_per_worker,
            "train.use_gpu": r.gpus_per_worker > 0, "eval.every_epochs": 1,
            **({"train.gpus_per_worker": r.gpus_per_worker} if r.gpus_per_worker > 0 else {}),
            "eval.max_train_samples": spec.eval_max_train_samples}


def trial_overrides(spec: TuneConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """Config overrides of one sampled trial (cluster sizes plus the searched keys)."""
    out: dict[str, Any] = {"hirl.num_clusters": list(sizes_from_params(params))}
    out.update({key: params[key] for key in spec.space.params})
    return out


def _corners(spec: TuneConfig, params: Params) -> list[tuple[str, dict[str, Any]]]:
    """Extreme points that together touch every bound of the space."""
    s = spec.space
    lo_k0 = int(s.level0_clusters.min)
    deepest = {"depth": int(s.depth.max), "level0_clusters": lo_k0,
               **{shrink_name(lv): s.shrink.min for lv in range(1, int(s.depth.max))}}
    widest = {"depth": int(s.depth.min), "level0_clusters": int(s.level0_clusters.max),
              **{shrink_name(lv): s.shrink.max for lv in range(1, int(s.depth.min))}}
    low = {key: d.values[0] if isinstance(d, Choice) else d.min for key, d in params}
    out = [("tune.space.depth.max", {**deepest, **low}),
           ("tune.space.level0_clusters.max", {**widest, **low})]
    for key, dist in params:
        values = dist.values if isinstance(dist, Choice) else (dist.min, dist.max)
        for v in values:
            out.append((f"tune.space.params.{key}", {**widest, **low, key: v}))
    return out


def check_against(spec: TuneConfig, params: Params, cfg: ExperimentConfig, num_samples: int,
                  level_names: Sequence[str], classes: Sequence[int] | None = None) -> None:
    """Checks that need the base experiment and the data (run before Ray starts).

    ``classes``: distinct labels per level of the train split, when known; a label metric of
    a level with one class scores every trial 1 and cannot rank them.

    Every corner of the space must give a valid experiment; cluster sizes must not exceed
    the training samples; ASHA's grace period must outlast the HIRL warm-up (a trial judged
    while still in warm-up is ranked on plain contrastive features, before HIRL's loss has
    had any effect) and leave epochs to stop early.
    """
    if spec.space.level0_clusters.max > num_samples:
        raise ConfigError(f"tune.space.level0_clusters.max={int(spec.space.level0_clusters.max)} "
                          f"exceeds the {num_samples} training samples; lower it")
    produced = level_metric_prefixes(cfg.eval.protocols, cfg.eval.params)
    for m in spec.metrics:
        prefix, _, level = m.partition("/")
        if m not in (*LABEL_FREE_METRICS, WALL_TIME_METRIC) and prefix not in produced:
            raise ConfigError(f"tune.metric {m!r}: no protocol in eval.protocols "
                              f"({', '.join(cfg.eval.protocols)}) reports {prefix}/<level>; "
                              f"they report {', '.join(produced)}")
        if prefix in produced and level not in level_names:
            have = ", ".join(level_names) or f"none (unlabelled data: use {LABEL_FREE_METRIC})"
            raise ConfigError(f"tune.metric {m!r}: no label level {level!r}; levels: {have}")
        j = list(level_names).index(level) if prefix in produced else -1
        if classes is not None and 0 <= j < len(classes) and classes[j] < 2:
            raise ConfigError(f"tune.metric {m!r}: label level {level!r} has a single class, so "
                              f"every trial scores the same; use {LABEL_FREE_METRIC}")
    base = {"hirl.enabled": True,
            **fixed_overrides(spec, cfg.storage.path, "check", cfg.eval.protocols)}
    warmups = [cfg.hirl.warmup_epochs]
    for where, point in _corners(spec, params):
        overrides = {**base, **trial_overrides(spec, point)}
        try:
            trial_cfg = load_config(cfg, overrides)
        except ConfigError as e:
            raise ConfigError(f"{where}: a trial at {point} would be invalid: {e}") from None
        warmups.append(trial_cfg.hirl.warmup_epochs)
    sched = spec.scheduler
    if sched.name == "asha":
        if sched.grace_period <= max(warmups):
            raise ConfigError(f"tune.scheduler.grace_period ({sched.grace_period}) must exceed "
                              f"the largest hirl.warmup_epochs ({max(warmups)}), or ASHA judges "
                              "trials before HIRL starts")
        if sched.grace_period >= cfg.train.epochs:
            raise ConfigError(f"tune.scheduler.grace_period ({sched.grace_period}) must be < "
                              f"train.epochs ({cfg.train.epochs}) or ASHA never stops a trial")
