"""The ``tune:`` section of an experiment file: strict parsing into frozen dataclasses.

``hirl_ray.config`` keeps ``tune:`` as a raw mapping (``ExperimentConfig.extras["tune"]``);
this module turns it into a :class:`TuneSpec` or raises :class:`~hirl_ray.config.ConfigError`
with one line naming the key (``tune.space.depth.min must be >= 1, got 0``). Nothing here
imports Ray or Optuna, so a bad space fails before anything starts.

Hierarchy shape (HIRL Sec. 3.1 needs ``K_0 > K_1 > ... > K_{L-1}``, ``K_0 <= N``): the space
is *depth* ``L`` (integer range), the level-0 size ``K_0`` (log-uniform integer) and one shrink
ratio ``r_l = K_l / K_{l-1}`` per level; :func:`hirl_ray.sweep.sampling.cluster_sizes` turns any
sample into a valid, strictly decreasing list, so no sampled trial can be invalid.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hirl_ray.config import SECTIONS, ConfigError

LEVEL_METRICS = ("knn_acc", "nmi", "ari", "acc")
LABEL_FREE_METRIC = "label_free/silhouette"
WALL_TIME_METRIC = "time_total_s"
# Keys the search may not touch: they are set by the sweep itself (shape, resources, eval).
_RESERVED = {"hirl.num_clusters", "hirl.enabled", "train.num_workers", "train.use_gpu",
             "train.cpus_per_worker", "train.gpus_per_worker", "train.epochs",
             "train.max_failures"}


@dataclass(frozen=True)
class Range:
    """Numeric range ``[min, max]``; ``is_int`` for integer config fields."""

    min: float
    max: float
    log: bool = False
    is_int: bool = False


@dataclass(frozen=True)
class Choice:
    """A categorical set of values."""

    values: tuple[Any, ...]


Dist = Range | Choice


@dataclass(frozen=True)
class HierarchySpace:
    """Depth, level-0 size (log scale) and per-level shrink ratio."""

    depth: Range = Range(2, 3, is_int=True)
    level0_clusters: Range = Range(8, 48, log=True, is_int=True)
    shrink: Range = Range(0.2, 0.6)


@dataclass(frozen=True)
class SchedulerSpec:
    """``asha`` (early stopping on per-epoch reports) or ``fifo`` (full budget)."""

    name: str = "asha"
    grace_period: int = 3
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class SearcherSpec:
    """``tpe`` (Optuna TPE), ``random`` (Optuna random) or ``grid`` (full grid)."""

    name: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 4
    grid_points: int = 3


@dataclass(frozen=True)
class ResourceSpec:
    """Ray Train workers per trial and what each of them reserves."""

    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: int = 0


@dataclass(frozen=True)
class StudyStorage:
    """Optuna storage: ``None`` = SQLite ``<sweep>/optuna.db``, an RDB URL or ``journal:<file>``.

    An RDB server (PostgreSQL/MySQL) or a journal file on a shared filesystem lets trials on
    many nodes share one study; SQLite is for one machine.
    """

    url: str | None = None
    study_name: str | None = None


@dataclass(frozen=True)
class TuneSpec:
    """A validated ``tune:`` section."""

    metrics: tuple[str, ...]
    modes: tuple[str, ...]
    num_trials: int = 8
    max_concurrent_trials: int = 1
    space: HierarchySpace = field(default_factory=HierarchySpace)
    params: tuple[tuple[str, Dist], ...] = ()
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    searcher: SearcherSpec = field(default_factory=SearcherSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    storage: StudyStorage = field(default_factory=StudyStorage)
    eval_max_train_samples: int = 480

    @property
    def metric(self) -> str:
        """The metric ASHA schedules on (the first one when multi-objective)."""
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1


def _mapping(key: str, raw: Any, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key} must be a mapping, got {raw!r}")
    for k in raw:
        if k not in allowed:
            raise ConfigError(f"unknown key {key}.{k}; valid keys: {', '.join(allowed)}")
    return raw


def _number(key: str, value: Any, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise ConfigError(f"{key} must be {'an integer' if integer else 'a number'}, "
                          f"got {value!r}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _range(key: str, raw: Any, integer: bool, default: Range | None = None) -> Range:
    m = _mapping(key, raw, ("min", "max", "log"))
    if default is None and ("min" not in m or "max" not in m):
        raise ConfigError(f"{key} needs both min and max, got {dict(m)!r}")
    lo = _number(f"{key}.min", m.get("min", default.min if default else 0), integer)
    hi = _number(f"{key}.max", m.get("max", default.max if default else 0), integer)
    log = _bool(f"{key}.log", m.get("log", default.log if default else False))
    if hi < lo:
        raise ConfigError(f"{key}.max ({hi}) must be >= {key}.min ({lo})")
    if log and lo <= 0:
        raise ConfigError(f"{key}.min must be > 0 for a log range, got {lo}")
    return Range(lo, hi, log, integer)


def _param(key: str, raw: Any) -> Dist:
    """One ``tune.space.params`` entry; its type follows the config field it sets."""
    section, _, name = key.partition(".")
    cls = SECTIONS.get(section)
    hints = typing.get_type_hints(cls) if cls is not None else {}
    where = f"tune.space.params.{key}"
    if section in ("storage", "data") or name not in hints or key in _RESERVED:
        raise ConfigError(f"{where}: not a searchable key; search section.key of model, "
                          "method, hirl, train or eval (depth/cluster sizes go in "
                          "tune.space.depth/level0_clusters/shrink)")
    kind = hints[name]
    if isinstance(raw, Mapping) and "choices" in raw:
        _mapping(where, raw, ("choices",))
        values = raw["choices"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.choices must be a non-empty list, got {values!r}")
        return Choice(tuple(values))
    if kind not in (int, float):
        raise ConfigError(f"{where}: {key} is not numeric; give {{choices: [...]}}")
    return _range(where, raw, integer=kind is int)


def _metrics(raw: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    metric = raw.get("metric")
    if metric is None:
        raise ConfigError("tune.metric is required, e.g. knn_acc/superclass, nmi/superclass, "
                          f"{LABEL_FREE_METRIC} (no labels needed) or a list of two")
    metrics = (metric,) if isinstance(metric, str) else metric
    if not isinstance(metrics, (list, tuple)) or not metrics or len(metrics) > 3:
        raise ConfigError(f"tune.metric must be a name or a list of 1-3 names, got {metric!r}")
    for m in metrics:
        prefix, _, level = str(m).partition("/")
        if not (m in (LABEL_FREE_METRIC, WALL_TIME_METRIC)
                or (prefix in LEVEL_METRICS and level and isinstance(m, str))):
            raise ConfigError(f"tune.metric: unknown metric {m!r}; use <{'|'.join(LEVEL_METRICS)}>"
                              f"/<label level>, {LABEL_FREE_METRIC} or {WALL_TIME_METRIC}")
    if len(set(metrics)) != len(metrics):
        raise ConfigError(f"tune.metric lists a metric twice: {list(metrics)}")
    default = tuple("min" if m == WALL_TIME_METRIC else "max" for m in metrics)
    mode = raw.get("mode", list(default))
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    if len(modes) != len(metrics) or any(x not in ("min", "max") for x in modes):
        raise ConfigError(f"tune.mode must be min or max per metric ({len(metrics)} given), "
                          f"got {mode!r}")
    return tuple(metrics), modes


_TOP = ("metric", "mode", "num_trials", "max_concurrent_trials", "space", "scheduler",
        "searcher", "resources", "storage", "eval_max_train_samples")


def parse_tune_spec(raw: Any) -> TuneSpec:
    """Validate a raw ``tune:`` mapping (syntax and ranges; see :func:`check_against` too)."""
    if raw is None:
        raise ConfigError("the experiment has no tune: section; add one (see "
                          "experiments/tune_default.yaml)")
    top = _mapping("tune", raw, _TOP)
    metrics, modes = _metrics(top)
    sp = _mapping("tune.space", top.get("space"), ("depth", "level0_clusters", "shrink", "params"))
    base = HierarchySpace()
    space = HierarchySpace(
        depth=_range("tune.space.depth", sp.get("depth"), True, base.depth),
        level0_clusters=_range("tune.space.level0_clusters", sp.get("level0_clusters"), True,
                               base.level0_clusters),
        shrink=_range("tune.space.shrink", sp.get("shrink"), False, base.shrink))
    if space.depth.min < 1:
        raise ConfigError(f"tune.space.depth.min must be >= 1, got {space.depth.min}")
    if space.level0_clusters.min < space.depth.max + 1:
        raise ConfigError(
            f"tune.space.level0_clusters.min must be >= depth.max + 1 = {space.depth.max + 1} "
            f"so every level keeps >= 2 clusters, got {space.level0_clusters.min}")
    if not 0 < space.shrink.min <= space.shrink.max < 1:
        raise ConfigError("tune.space.shrink.min/max must satisfy 0 < min <= max < 1 "
                          f"(K_l = r * K_(l-1)), got {space.shrink.min}..{space.shrink.max}")
    params_raw = _mapping("tune.space.params", sp.get("params"), tuple(sp.get("params") or ()))
    params = tuple((str(k), _param(str(k), v)) for k, v in params_raw.items())

    sc = _mapping("tune.scheduler", top.get("scheduler"),
                  ("name", "grace_period", "reduction_factor"))
    scheduler = SchedulerSpec(
        name=str(sc.get("name", "asha")),
        grace_period=int(_number("tune.scheduler.grace_period", sc.get("grace_period", 3), True)),
        reduction_factor=float(_number("tune.scheduler.reduction_factor",
                                       sc.get("reduction_factor", 2.0))))
    if scheduler.name not in ("asha", "fifo"):
        raise ConfigError(f"tune.scheduler.name must be asha or fifo, got {scheduler.name!r}")
    if scheduler.grace_period < 1 or scheduler.reduction_factor <= 1:
        raise ConfigError("tune.scheduler.grace_period must be >= 1 and reduction_factor > 1, "
                          f"got {scheduler.grace_period} and {scheduler.reduction_factor}")
    se = _mapping("tune.searcher", top.get("searcher"),
                  ("name", "seed", "n_startup_trials", "grid_points"))
    searcher = SearcherSpec(
        name=str(se.get("name", "tpe")), seed=int(_number("tune.searcher.seed", se.get("seed", 0),
                                                          True)),
        n_startup_trials=int(_number("tune.searcher.n_startup_trials",
                                     se.get("n_startup_trials", 4), True)),
        grid_points=int(_number("tune.searcher.grid_points", se.get("grid_points", 3), True)))
    if searcher.name not in ("tpe", "random", "grid"):
        raise ConfigError(f"tune.searcher.name must be tpe, random or grid, got {searcher.name!r}")
    if searcher.n_startup_trials < 1 or searcher.grid_points < 2:
        raise ConfigError("tune.searcher.n_startup_trials must be >= 1 and grid_points >= 2")
    re_ = _mapping("tune.resources", top.get("resources"),
                   ("workers_per_trial", "cpus_per_worker", "gpus_per_worker"))
    resources = ResourceSpec(
        workers_per_trial=int(_number("tune.resources.workers_per_trial",
                                      re_.get("workers_per_trial", 1), True)),
        cpus_per_worker=float(_number("tune.resources.cpus_per_worker",
                                      re_.get("cpus_per_worker", 1.0))),
        gpus_per_worker=int(_number("tune.resources.gpus_per_worker",
                                    re_.get("gpus_per_worker", 0), True)))
    if resources.workers_per_trial < 1 or resources.cpus_per_worker <= 0 \
            or resources.gpus_per_worker not in (0, 1):
        raise ConfigError("tune.resources: workers_per_trial must be >= 1, cpus_per_worker > 0 "
                          f"and gpus_per_worker 0 or 1, got {resources}")
    st = _mapping("tune.storage", top.get("storage"), ("url", "study_name"))
    storage = StudyStorage(url=st.get("url"), study_name=st.get("study_name"))
    if storage.url is not None and not (isinstance(storage.url, str) and (
            "://" in storage.url or storage.url.startswith("journal:"))):
        raise ConfigError("tune.storage.url must be an SQLAlchemy URL (sqlite:///x.db, "
                          f"postgresql://...) or journal:<file>, got {storage.url!r}")
    spec = TuneSpec(
        metrics=metrics, modes=modes,
        num_trials=int(_number("tune.num_trials", top.get("num_trials", 8), True)),
        max_concurrent_trials=int(_number("tune.max_concurrent_trials",
                                          top.get("max_concurrent_trials", 1), True)),
        space=space, params=params, scheduler=scheduler, searcher=searcher,
        resources=resources, storage=storage,
        eval_max_train_samples=int(_number("tune.eval_max_train_samples",
                                           top.get("eval_max_train_samples", 480), True)))
    if spec.num_trials < 1 or spec.max_concurrent_trials < 1 or spec.eval_max_train_samples < 0:
        raise ConfigError("tune.num_trials and tune.max_concurrent_trials must be >= 1 and "
                          "tune.eval_max_train_samples >= 0")
    return spec
