"""The ``tune:`` section of an experiment file: frozen dataclasses the config loader builds.

``hirl_ray.config.build`` parses ``tune:`` like every other section (registered below), so a
wrong key or type fails at load time with one line naming it
(``tune.space.depth.min must be >= 1, got 0``); each dataclass checks its own values in
``check(where)``. Checks that need the base experiment or the data (which config key a
``tune.space.params`` entry sets, label levels, corners of the space) are in
:func:`hirl_ray.sweep.sampling.check_against`. Nothing here imports Ray or Optuna.

Hierarchy shape (HIRL Sec. 3.1 needs ``K_0 > K_1 > ... > K_{L-1}``, ``K_0 <= N``): the space
is *depth* ``L`` (integer range), the level-0 size ``K_0`` (log-uniform integer) and one shrink
ratio ``r_l = K_l / K_{l-1}`` per level; :func:`hirl_ray.sweep.sampling.cluster_sizes` turns any
sample into a valid, strictly decreasing list, so no sampled trial can be invalid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hirl_ray.config import ConfigError, ExperimentConfig, build, register_section
from hirl_ray.eval.label_free import criterion_metrics
from hirl_ray.eval.protocol import level_metric_prefixes

TUNE_SECTION = "tune"
#: Every label-free criterion a sweep can optimise (``label_free/<criterion>``); each trial
#: reports all of them every epoch (the sweep adds the ``label_free`` protocol).
LABEL_FREE_METRICS = criterion_metrics()
#: The one the README recommends for unlabelled data (experiments/labelfree/ calibration).
LABEL_FREE_METRIC = "label_free/rankme"
WALL_TIME_METRIC = "time_total_s"
MODES = ("min", "max")
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("tpe", "random", "grid")


@dataclass(frozen=True)
class Range:
    """Numeric range ``[min, max]``, sampled uniformly (log-uniformly with ``log``)."""

    min: float
    max: float
    log: bool = False
    is_int: ClassVar[bool] = False

    def check(self, where: str) -> None:
        if self.max < self.min:
            raise ConfigError(f"{where}.max ({self.max}) must be >= {where}.min ({self.min})")
        if self.log and self.min <= 0:
            raise ConfigError(f"{where}.min must be > 0 for a log range, got {self.min}")


@dataclass(frozen=True)
class IntRange(Range):
    """Integer range (for integer config keys)."""

    min: int
    max: int
    is_int: ClassVar[bool] = True


@dataclass(frozen=True)
class DepthRange(IntRange):
    """``tune.space.depth``: number of prototype levels."""

    min: int = 2
    max: int = 3


@dataclass(frozen=True)
class Level0Range(IntRange):
    """``tune.space.level0_clusters``: ``K_0``, log scale by default."""

    min: int = 8
    max: int = 48
    log: bool = True


@dataclass(frozen=True)
class ShrinkRange(Range):
    """``tune.space.shrink``: each level's ``r_l = K_l / K_{l-1}``."""

    min: float = 0.2
    max: float = 0.6


@dataclass(frozen=True)
class Choice:
    """A categorical set of values (what a ``{choices: [...]}`` entry samples from)."""

    values: tuple[Any, ...]


Dist = Range | Choice


@dataclass(frozen=True)
class ParamSpec:
    """One ``tune.space.params`` entry: ``{min, max, log}`` or ``{choices: [...]}``.

    Whether a range is integer follows the config key it sets (its dataclass field type), known
    only with the experiment: :func:`hirl_ray.sweep.sampling.search_params` resolves it.
    """

    min: float | None = None
    max: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def check(self, where: str) -> None:
        if self.choices is not None:
            if self.min is not None or self.max is not None or self.log:
                raise ConfigError(f"{where}: give either choices or min/max/log, not both")
            if not self.choices:
                raise ConfigError(f"{where}.choices must be a non-empty list, got []")
            return
        if self.min is None or self.max is None:
            given = {k: v for k, v in (("min", self.min), ("max", self.max)) if v is not None}
            raise ConfigError(f"{where} needs both min and max, got {given!r}")
        Range(self.min, self.max, self.log).check(where)

    def dist(self, where: str, is_int: bool) -> Dist:
        """The distribution to sample, integer when the config key is an ``int``."""
        if self.choices is not None:
            return Choice(self.choices)
        assert self.min is not None and self.max is not None  # check() ran
        if not is_int:
            return Range(self.min, self.max, self.log)
        for name, value in (("min", self.min), ("max", self.max)):
            if not float(value).is_integer():
                raise ConfigError(f"{where}.{name} must be an integer, got {value!r}")
        return IntRange(int(self.min), int(self.max), self.log)


@dataclass(frozen=True)
class HierarchySpace:
    """Depth, level-0 size (log scale), per-level shrink ratio, and other searched keys."""

    depth: DepthRange = field(default_factory=DepthRange)
    level0_clusters: Level0Range = field(default_factory=Level0Range)
    shrink: ShrinkRange = field(default_factory=ShrinkRange)
    params: Mapping[str, ParamSpec] = field(default_factory=dict)

    def check(self, where: str) -> None:
        if self.depth.min < 1:
            raise ConfigError(f"{where}.depth.min must be >= 1, got {self.depth.min}")
        if self.level0_clusters.min < self.depth.max + 1:
            raise ConfigError(
                f"{where}.level0_clusters.min must be >= depth.max + 1 = {self.depth.max + 1} "
                f"so every level keeps >= 2 clusters, got {self.level0_clusters.min}")
        if not 0 < self.shrink.min <= self.shrink.max < 1:
            raise ConfigError(f"{where}.shrink.min/max must satisfy 0 < min <= max < 1 "
                              f"(K_l = r * K_(l-1)), got {self.shrink.min}..{self.shrink.max}")


@dataclass(frozen=True)
class SchedulerSpec:
    """``asha`` (early stopping on per-epoch reports) or ``fifo`` (full budget)."""

    name: str = "asha"
    grace_period: int = 3
    reduction_factor: float = 2.0

    def check(self, where: str) -> None:
        if self.name not in SCHEDULERS:
            raise ConfigError(f"{where}.name must be asha or fifo, got {self.name!r}")
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ConfigError(f"{where}.grace_period must be >= 1 and reduction_factor > 1, "
                              f"got {self.grace_period} and {self.reduction_factor}")


@dataclass(frozen=True)
class SearcherSpec:
    """``tpe`` (Optuna TPE), ``random`` (Optuna random) or ``grid`` (full grid)."""

    name: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 4
    grid_points: int = 3

    def check(self, where: str) -> None:
        if self.name not in SEARCHERS:
            raise ConfigError(f"{where}.name must be tpe, random or grid, got {self.name!r}")
        if self.n_startup_trials < 1 or self.grid_points < 2:
            raise ConfigError(f"{where}.n_startup_trials must be >= 1 and grid_points >= 2")


@dataclass(frozen=True)
class ResourceSpec:
    """Ray Train workers per trial and what each of them reserves."""

    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: int = 0

    def check(self, where: str) -> None:
        if self.workers_per_trial < 1 or self.cpus_per_worker <= 0 \
                or self.gpus_per_worker not in (0, 1):
            raise ConfigError(f"{where}: workers_per_trial must be >= 1, cpus_per_worker > 0 "
                              f"and gpus_per_worker 0 or 1, got {self}")


@dataclass(frozen=True)
class StudyStorage:
    """Optuna storage: ``None`` = SQLite ``<sweep>/optuna.db``, an RDB URL or ``journal:<file>``.

    An RDB server (PostgreSQL/MySQL) or a journal file on a shared filesystem lets trials on
    many nodes share one study; SQLite is for one machine.
    """

    url: str | None = None
    study_name: str | None = None

    def check(self, where: str) -> None:
        if self.url is not None and not ("://" in self.url or self.url.startswith("journal:")):
            raise ConfigError(f"{where}.url must be an SQLAlchemy URL (sqlite:///x.db, "
                              f"postgresql://...) or journal:<file>, got {self.url!r}")


@dataclass(frozen=True)
class TuneConfig:
    """The ``tune:`` section. ``metric``: one name or a list of 1-3 (multi-objective);
    ``mode``: ``min``/``max`` per metric (default: ``min`` for wall time, else ``max``)."""

    metric: str | tuple[str, ...] | None = None
    mode: str | tuple[str, ...] | None = None
    num_trials: int = 8
    max_concurrent_trials: int = 1
    space: HierarchySpace = field(default_factory=HierarchySpace)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    searcher: SearcherSpec = field(default_factory=SearcherSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    storage: StudyStorage = field(default_factory=StudyStorage)
    eval_max_train_samples: int = 480

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every optimised metric (``metric`` as a tuple)."""
        return (self.metric,) if isinstance(self.metric, str) else tuple(self.metric or ())

    @property
    def modes(self) -> tuple[str, ...]:
        """``min``/``max`` per metric."""
        if self.mode is None:
            return tuple("min" if m == WALL_TIME_METRIC else "max" for m in self.metrics)
        return (self.mode,) if isinstance(self.mode, str) else tuple(self.mode)

    @property
    def primary_metric(self) -> str:
        """The metric ASHA schedules on (the first one when multi-objective)."""
        return self.metrics[0]

    @property
    def primary_mode(self) -> str:
        return self.modes[0]

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    def check(self, where: str) -> None:
        self._check_metrics(where)
        if self.num_trials < 1 or self.max_concurrent_trials < 1 \
                or self.eval_max_train_samples < 0:
            raise ConfigError(f"{where}.num_trials and {where}.max_concurrent_trials must be "
                              f">= 1 and {where}.eval_max_train_samples >= 0")

    def _check_metrics(self, where: str) -> None:
        if self.metric is None:
            raise ConfigError(f"{where}.metric is required, e.g. knn_acc/superclass, "
                              f"nmi/superclass, {LABEL_FREE_METRIC} (no labels needed) or a "
                              "list of two")
        metrics = self.metrics
        if not metrics or len(metrics) > 3:
            raise ConfigError(f"{where}.metric must be a name or a list of 1-3 names, "
                              f"got {list(metrics)!r}")
        # The form here; whether the experiment's eval.protocols report it (several kNN k add
        # keys, for one): sampling.check_against, which sees the whole experiment.
        for m in metrics:
            prefix, _, level = m.partition("/")
            if prefix == "label_free" and m not in LABEL_FREE_METRICS:
                raise ConfigError(f"{where}.metric: unknown label-free criterion {m!r}; use one "
                                  f"of {', '.join(LABEL_FREE_METRICS)}")
            if not (m == WALL_TIME_METRIC or (prefix and level and "/" not in level)):
                raise ConfigError(f"{where}.metric: unknown metric {m!r}; use "
                                  f"<{'|'.join(level_metric_prefixes())}>/<label level>, "
                                  f"{LABEL_FREE_METRIC} or {WALL_TIME_METRIC}")
        if len(set(metrics)) != len(metrics):
            raise ConfigError(f"{where}.metric lists a metric twice: {list(metrics)}")
        modes = self.modes
        if len(modes) != len(metrics) or any(x not in MODES for x in modes):
            raise ConfigError(f"{where}.mode must be min or max per metric ({len(metrics)} "
                              f"given), got {self.mode!r}")


register_section(TUNE_SECTION, TuneConfig)


_NO_TUNE = "the experiment has no tune: section; add one (see experiments/tune_default.yaml)"


def tune_spec(cfg: ExperimentConfig) -> TuneConfig:
    """The experiment's parsed ``tune:`` section, or a one-line error when it has none."""
    spec = cfg.section(TUNE_SECTION)
    if spec is None:
        raise ConfigError(_NO_TUNE)
    return spec


def parse_tune_spec(raw: Any) -> TuneConfig:
    """A raw ``tune:`` mapping through the config loader (for callers holding only the dict)."""
    if raw is None:
        raise ConfigError(_NO_TUNE)
    return build(TUNE_SECTION, TuneConfig, raw)
