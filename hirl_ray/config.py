"""Experiment configuration: frozen dataclasses and a strict YAML loader.

Every key has one typed home here. Unknown keys, wrong types and impossible values
raise :class:`ConfigError` with one line that names the key and says the fix, before
any data is generated or Ray is started.

Batch size is *global* (summed over Ray Train workers) and must divide evenly: each worker
gets ``train.batch_size / train.num_workers``. The learning rate is used as given
(no implicit scaling rule).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class DataConfig:
    """Where images come from.

    ``name``: synthetic | imagefolder | npz | cifar10 | cifar100 | digits.
    """

    name: str = "synthetic"
    root: str | None = None
    image_size: int = 32
    # Built-in synthetic set only: images per leaf class in the train / test split.
    train_per_class: int = 100
    test_per_class: int = 40
    seed: int = 0
    loader_workers: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Backbone: small_cnn | resnet18 | resnet50 (``small_stem`` for ≤64 px inputs).

    ``sync_bn``: with more than one worker, BatchNorm statistics are computed over the global
    batch (SyncBatchNorm, also on CPU/gloo) instead of each worker's share.
    """

    backbone: str = "small_cnn"
    small_stem: bool = True
    width: int = 64
    sync_bn: bool = False


@dataclass(frozen=True)
class MethodConfig:
    """The base SSL method HIRL sits on: simclr | mocov2 | simsiam | byol."""

    name: str = "simclr"
    proj_dim: int = 128
    hidden_dim: int = 512
    temperature: float = 0.2
    momentum: float = 0.99
    queue_size: int = 4096


@dataclass(frozen=True)
class HirlConfig:
    """Hierarchy and semantic-path loss (HIRL, Xu et al. 2022, Sec. 3)."""

    enabled: bool = True
    num_clusters: tuple[int, ...] = (48, 12, 4)
    warmup_epochs: int = 2
    rebuild_every_epochs: int = 2
    num_neg_paths: int = 100
    weight: float = 1.0
    kmeans_iters: int = 20
    kmeans_nredo: int = 5
    max_points_per_centroid: int = 1000
    # False = the official behaviour: training pauses while k-means runs.
    async_rebuild: bool = True
    actor_num_cpus: float = 0.0
    actor_num_gpus: float = 0.0
    # The defaults below are the official HIRL code's choices; see README "Where we follow /
    # leave the official HIRL code" for each alternative and its cost.
    # projection: heads on the online projector output of view 0, clustering on the target
    # (else online) projector output; backbone: both on backbone features (d x d heads, D-dim
    # k-means). Room for vit_cls / vit_mean (official ``train_emb``) once ViTs exist.
    embedding: str = "projection"
    # random: faiss' default seeding (official); kmeans++: exact above level 0, AFK-MC2 at
    # level 0, single-threaded on CPU even with faiss-gpu (O(m K^2 D) per restart).
    kmeans_init: str = "random"
    # per_sample: mean over each sample's true negatives, then over the batch (official);
    # pooled: one mean over all true negatives of the batch.
    neg_average: str = "per_sample"


#: Choices of the ``hirl:`` string keys (here, because config.py imports nothing of ours).
HIRL_EMBEDDINGS = ("projection", "backbone")
KMEANS_INITS = ("random", "kmeans++")
NEG_AVERAGES = ("per_sample", "pooled")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and Ray Train workers. ``batch_size`` is global over workers."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 1e-4
    optimizer: str = "sgd"
    warmup_lr_epochs: int = 0
    num_workers: int = 2
    use_gpu: bool = False
    amp: bool = True
    seed: int = 0
    cpus_per_worker: float = 1.0
    # GPUs each worker reserves when use_gpu (a fraction shares one GPU, e.g. with the actor).
    gpus_per_worker: float = 1.0
    max_failures: int = 0


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on frozen backbone features (defaults fixed; see README)."""

    knn_k: int = 20
    knn_temperature: float = 0.07
    every_epochs: int = 0
    max_train_samples: int = 0


@dataclass(frozen=True)
class StorageConfig:
    """Results root: ``path/name`` holds checkpoints, hierarchy snapshots and metrics."""

    path: str = "results"
    name: str = "default"


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment; build one with :func:`load_config`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    hirl: HirlConfig = field(default_factory=HirlConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    # Extra top-level sections owned by other features (tune:) are kept as raw mappings
    # and validated by their owners.
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> str:
        """``storage.path/storage.name`` (a local path or an ``s3://`` URI)."""
        return f"{self.storage.path.rstrip('/')}/{self.storage.name}"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe) that :func:`load_config` accepts back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extras":
                continue
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v
                           for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
        out.update({k: v for k, v in self.extras.items()})
        return out


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "method": MethodConfig, "hirl": HirlConfig,
    "train": TrainConfig, "eval": EvalConfig, "storage": StorageConfig,
}
EXTRA_SECTIONS = ("tune",)

def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation; return it in the field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        if isinstance(value, (int, float, str, bool)) or value is None:
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation for {key}: {annotation}")  # programming error


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in known:
            raise ConfigError(f"unknown key {name}.{k}; valid keys: {', '.join(sorted(known))}")
    return cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in raw.items()})


def _check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def _check_positive(cfg: ExperimentConfig) -> None:
    for key in ("data.image_size", "data.train_per_class", "data.test_per_class",
                "model.width", "method.proj_dim", "method.hidden_dim", "method.queue_size",
                "hirl.kmeans_iters", "hirl.kmeans_nredo", "hirl.max_points_per_centroid",
                "hirl.rebuild_every_epochs", "train.epochs", "train.batch_size",
                "train.num_workers", "eval.knn_k"):
        section, attr = key.split(".")
        if getattr(getattr(cfg, section), attr) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(getattr(cfg, section), attr)}")
    for key in ("method.temperature", "train.lr", "eval.knn_temperature",
                "train.cpus_per_worker", "train.gpus_per_worker"):
        section, attr = key.split(".")
        if not getattr(getattr(cfg, section), attr) > 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(getattr(cfg, section), attr)}")
    for key in ("hirl.warmup_epochs", "hirl.num_neg_paths", "hirl.weight", "train.weight_decay",
                "train.warmup_lr_epochs", "train.max_failures", "eval.every_epochs",
                "eval.max_train_samples", "data.loader_workers", "hirl.actor_num_cpus",
                "hirl.actor_num_gpus"):
        section, attr = key.split(".")
        if getattr(getattr(cfg, section), attr) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(getattr(cfg, section), attr)}")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cross-field checks that need no data; data-size checks happen in ``api.fit``."""
    from hirl_ray.data import DATASETS
    from hirl_ray.methods import METHODS
    from hirl_ray.models import BACKBONES

    _check_positive(cfg)
    _check_choice("data.name", cfg.data.name, DATASETS)
    _check_choice("model.backbone", cfg.model.backbone, BACKBONES)
    _check_choice("method.name", cfg.method.name, METHODS)
    _check_choice("train.optimizer", cfg.train.optimizer, ("sgd", "adamw", "lars"))
    _check_choice("hirl.embedding", cfg.hirl.embedding, HIRL_EMBEDDINGS)
    _check_choice("hirl.kmeans_init", cfg.hirl.kmeans_init, KMEANS_INITS)
    _check_choice("hirl.neg_average", cfg.hirl.neg_average, NEG_AVERAGES)
    if not 0.0 <= cfg.method.momentum < 1.0:
        raise ConfigError(f"method.momentum must be in [0, 1), got {cfg.method.momentum}")
    if cfg.data.name not in ("synthetic", "digits") and not cfg.data.root:
        raise ConfigError(f"data.root is required for data.name={cfg.data.name!r}; "
                          "set it to the dataset's local path")
    k = cfg.hirl.num_clusters
    if cfg.hirl.enabled:
        if not k:
            raise ConfigError("hirl.num_clusters must list one cluster count per level, got []")
        for i, n in enumerate(k):
            if n < 2:
                raise ConfigError(f"hirl.num_clusters[{i}] must be >= 2, got {n}")
        for i in range(1, len(k)):
            if k[i] >= k[i - 1]:
                raise ConfigError(
                    f"hirl.num_clusters must strictly decrease per level, got {list(k)} "
                    f"(level {i} >= level {i - 1})")
        if cfg.hirl.warmup_epochs >= cfg.train.epochs:
            raise ConfigError(
                f"hirl.warmup_epochs ({cfg.hirl.warmup_epochs}) must be < train.epochs "
                f"({cfg.train.epochs}), or HIRL never starts; lower it or set hirl.enabled=false")
    gpus = cfg.train.gpus_per_worker
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"train.gpus_per_worker must be a fraction <= 1 or a whole number, got "
                          f"{gpus}; Ray cannot split a request across GPUs")
    if cfg.train.batch_size % cfg.train.num_workers:
        b, w = cfg.train.batch_size, cfg.train.num_workers
        raise ConfigError(f"train.batch_size ({b}) is global and must be divisible by "
                          f"train.num_workers ({w}); use e.g. train.batch_size={b // w * w or w}")
    if cfg.train.batch_size < cfg.train.num_workers * 2:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) is global and must give "
                          f"each of the {cfg.train.num_workers} workers >= 2 samples")
    if "/" in cfg.storage.name or not cfg.storage.name:
        raise ConfigError(f"storage.name must be a plain folder name, got {cfg.storage.name!r}")
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"hirl.num_clusters=[30,10]"`` → ``("hirl.num_clusters", (30, 10))`` (YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.strip(), value


def _apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) == 1 and isinstance(value, Mapping):
            out.setdefault(key, {}).update(value)
            continue
        if len(parts) < 2:
            raise ConfigError(f"override {key!r} must name section.key, e.g. train.epochs")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ConfigError(f"override {key!r}: {p} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return out


def from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Any] | Iterable[str] | None = None,
              source: str = "config") -> ExperimentConfig:
    """Build and validate a config from a nested mapping plus overrides."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = dict(parse_override(o) for o in overrides)
    merged = _apply_overrides(dict(raw), overrides or {})
    for k in merged:
        if k not in SECTIONS and k not in EXTRA_SECTIONS:
            raise ConfigError(f"{source}: unknown section {k!r}; valid sections: "
                              f"{', '.join([*SECTIONS, *EXTRA_SECTIONS])}")
    sections = {name: _build_section(name, cls, merged.get(name)) for name, cls in SECTIONS.items()}
    extras = {k: merged[k] for k in EXTRA_SECTIONS if k in merged}
    return validate(ExperimentConfig(**sections, extras=extras))


def load_config(source: str | Path | Mapping[str, Any] | ExperimentConfig | None = None,
                overrides: Mapping[str, Any] | Iterable[str] | None = None) -> ExperimentConfig:
    """Load a YAML file, a dict, or the embedded default (``None``), then apply overrides.

    The embedded default is the dataclass defaults above; ``experiments/default.yaml``
    spells the same values out (a test keeps the two equal).
    """
    if isinstance(source, ExperimentConfig):
        if not overrides:
            return validate(source)
        return from_dict(source.to_dict(), overrides)
    if isinstance(source, Mapping):
        return from_dict(source, overrides)
    if source is None:
        return from_dict({}, overrides, source="default")
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass a path to an experiment YAML")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return from_dict(raw, overrides, source=str(path))
