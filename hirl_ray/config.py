"""Experiment configuration: frozen dataclasses, the name registries and one strict YAML loader.

Every key has one typed home. Unknown keys, wrong types and impossible values raise
:class:`ConfigError` with one line that names the key and says the fix, before any data is
generated or Ray is started.

This module is the leaf of the package: it imports nothing of ``hirl_ray``. The layers above
register what they implement in the registries below (``DATASETS``, ``BACKBONES``, ``METHODS``,
``PROTOCOLS``) and may add top-level sections (``register_section``, e.g. ``tune:``); the loader
checks names against them once, at load time. A method's ``method:`` section is the dataclass
its class names in ``Config``, chosen by ``method.name``.

The loader recurses into nested dataclasses, ``tuple[...]``, ``Mapping[str, ...]`` and unions;
a dataclass may define ``check(self, where)`` for its own value checks (``where`` is its dotted
key, e.g. ``"train"``), called right after it is built.

Batch size is *global* (summed over Ray Train workers) and must divide evenly: each worker
gets ``train.batch_size / train.num_workers``. The learning rate is used as given
(no implicit scaling rule).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the fix."""


class RunStopped(RuntimeError):
    """A run stopped on purpose by a policy (``train.on_nan``, ``data.on_bad_file``).

    The message's last line names the step or file and the fix. Raised in a Ray worker or a
    DataLoader worker process, it arrives wrapped in their tracebacks; :attr:`summary` is the
    one line to show.
    """

    @property
    def summary(self) -> str:
        """The last line of the message, without a ``module.Class:`` prefix added on the way."""
        lines = [line.strip() for line in str(self).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        head, sep, rest = last.partition(": ")
        return rest if sep and head.rsplit(".", 1)[-1] == type(self).__name__ else last


class Registry:
    """The names one config key accepts, each with what implements it.

    Filled by the module that implements an entry (``METHODS.register("simclr", SimCLR)``);
    read by the loader (names) and by the builders (entries).
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any) -> Any:
        """Add ``name``; registering another entry under a taken name is an error."""
        old = self._entries.get(name)
        if old is not None and getattr(old, "__qualname__", old) != getattr(
                entry, "__qualname__", entry):
            raise ValueError(f"{self.key}: {name!r} is already registered to {old!r}")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a toy entry clean up with this)."""
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> typing.Iterator[str]:
        return iter(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def items(self) -> list[tuple[str, Any]]:
        return list(self._entries.items())

    def get(self, name: str) -> Any:
        """The entry of ``name``, or a one-line ``ConfigError`` listing the choices."""
        if name not in self._entries:
            raise ConfigError(f"{self.key} must be one of {', '.join(self._entries)}, "
                              f"got {name!r}")
        return self._entries[name]


DATASETS = Registry("data.name")
BACKBONES = Registry("model.backbone")
#: ``method.name`` → the method class; its ``Config`` is the ``method:`` section's dataclass.
METHODS = Registry("method.name")
#: ``eval.protocols`` → an evaluation protocol (see ``hirl_ray/eval/protocol.py``).
PROTOCOLS = Registry("eval.protocols")
DEFAULT_METHOD = "simclr"


# ---- value checks shared by the sections' ``check`` methods --------------------------------

def check_positive(obj: Any, where: str, *names: str, strict: bool = True) -> None:
    """``obj.<name> > 0`` (``>= 0`` with ``strict=False``) for each name, else ConfigError."""
    for name in names:
        value = getattr(obj, name)
        if not (value > 0 if strict else value >= 0):
            raise ConfigError(f"{where}.{name} must be {'>' if strict else '>='} 0, got {value}")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_fraction(key: str, value: float, upper_open: bool = True) -> None:
    """``0 <= value < 1`` (``<= 1`` with ``upper_open=False``)."""
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        raise ConfigError(f"{key} must be in [0, 1{')' if upper_open else ']'}, got {value}")


# ---- sections ----------------------------------------------------------------------------

#: ``data.on_bad_file``: what an unreadable image file does.
ON_BAD_FILE = ("error", "skip")
#: Where the training views are made: the loader's CPU workers, or the worker's GPU (batched).
AUGMENT_ON = ("cpu", "gpu")
#: ``data.loader``: who feeds the training workers (``torch``: a DataLoader in each worker;
#: ``ray_data``: a Ray Dataset decoded on the cluster's CPUs, ``train/ray_data.py``).
LOADERS = ("torch", "ray_data")


@dataclass(frozen=True)
class DataConfig:
    """Where images come from; ``name`` is one of ``DATASETS`` (synthetic, imagefolder, …)."""

    name: str = "synthetic"
    root: str | None = None
    image_size: int = 32
    # Built-in synthetic set only: images per leaf class in the train / test split.
    train_per_class: int = 100
    test_per_class: int = 40
    seed: int = 0
    loader_workers: int = 0
    # An unreadable image (corrupt, truncated, empty, not an image): error = stop naming the
    # file; skip = use the next readable one, counted in data/bad_files_skipped.
    on_bad_file: str = "error"
    # cpu: the loader's workers make the views (PIL + torchvision); gpu: they only decode, and
    # the views are made batched on the worker's GPU (hirl_ray.data.device_views).
    augment_on: str = "cpu"
    # Input pipeline: torch (each worker decodes with its own DataLoader) or ray_data (a Ray
    # Dataset decodes and augments on any node with CPUs and streams batches to the workers).
    loader: str = "torch"
    # ray_data only: CPUs per decode/augment actor, and at most this many actors (0: as many
    # as the cluster's free CPUs allow; Ray Data scales the pool).
    ray_data_cpus: float = 1.0
    ray_data_max_actors: int = 0

    def __post_init__(self) -> None:
        # A relative local root means "from where the command runs": made absolute here, on the
        # driver, because Ray workers run in another directory. URIs and ~ paths stay as given.
        root = self.root
        if root and "://" not in root and not root.startswith("~") and not os.path.isabs(root):
            object.__setattr__(self, "root", os.path.abspath(root))

    def check(self, where: str) -> None:
        check_positive(self, where, "image_size", "train_per_class", "test_per_class")
        check_positive(self, where, "loader_workers", strict=False)
        check_choice(f"{where}.on_bad_file", self.on_bad_file, ON_BAD_FILE)
        check_choice(f"{where}.augment_on", self.augment_on, AUGMENT_ON)
        check_choice(f"{where}.loader", self.loader, LOADERS)
        if self.augment_on == "gpu" and self.loader == "ray_data":
            raise ConfigError(f"{where}.augment_on=gpu needs {where}.loader=torch (the Ray Data "
                              "path makes the views on its CPU actors); choose one of the two")
        check_positive(self, where, "ray_data_cpus")
        check_positive(self, where, "ray_data_max_actors", strict=False)
        check_choice(f"{where}.name", self.name, DATASETS.names())
        if getattr(DATASETS.get(self.name), "needs_root", True) and not self.root:
            raise ConfigError(f"{where}.root is required for {where}.name={self.name!r}; "
                              "set it to the dataset's local path or s3:// URI")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, one of ``BACKBONES`` (``small_stem`` for ≤64 px inputs).

    ``sync_bn``: with more than one worker, BatchNorm statistics are computed over the global
    batch (SyncBatchNorm, also on CPU/gloo) instead of each worker's share.
    """

    backbone: str = "small_cnn"
    small_stem: bool = True
    width: int = 64
    sync_bn: bool = False
    # ViTs (backbone vit_*): patch side in pixels (null: vit_tiny an 8x8 grid, vit_b_16 16) and
    # the stochastic-depth rate of the last block (the paper's ViT-B/16 recipes: 0.1).
    patch_size: int | None = None
    drop_path: float = 0.0

    @property
    def is_vit(self) -> bool:
        """ViT backbones are the ones named ``vit_*`` (they expose patch tokens)."""
        return self.backbone.startswith("vit")

    def check(self, where: str) -> None:
        check_positive(self, where, "width")
        check_choice(f"{where}.backbone", self.backbone, BACKBONES.names())
        if self.patch_size is not None and self.patch_size < 1:
            raise ConfigError(f"{where}.patch_size must be a positive number of pixels or null, "
                              f"got {self.patch_size}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"{where}.drop_path must be in [0, 1), got {self.drop_path}")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's own ``method:`` dataclass (declared next to its class).

    ``shape_keys``: keys that change the network's parameters; a run folder trained with other
    values cannot be resumed.
    """

    name: str = DEFAULT_METHOD
    shape_keys: typing.ClassVar[tuple[str, ...]] = ()


#: Choices of the ``hirl:`` string keys.
HIRL_EMBEDDINGS = ("projection", "backbone", "vit_cls", "vit_mean")
KMEANS_INITS = ("random", "kmeans++")
NEG_AVERAGES = ("per_sample", "pooled")


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
    # k-means); vit_cls: the projection of a ViT's [CLS] token (= projection, official
    # ``train_emb: vit_cls``); vit_mean: the mean over patch tokens of their projections
    # (official ``vit_mean``; methods that project patch tokens: iBOT, BEiT).
    embedding: str = "projection"
    # random: faiss' default seeding (official); kmeans++: exact above level 0, AFK-MC2 at
    # level 0, single-threaded on CPU even with faiss-gpu (O(m K^2 D) per restart).
    kmeans_init: str = "random"
    # per_sample: mean over each sample's true negatives, then over the batch (official);
    # pooled: one mean over all true negatives of the batch.
    neg_average: str = "per_sample"
    # Each step re-assigns its samples to the level-0 prototype nearest to their second view's
    # clustering features (official HIRL-SwAV: true; the other official configs: false).
    iter_wise_assignment: bool = False
    # Linear layers of each level's head (official ``num_mlp_layer``: 2; HIRL-MoCo v3: 5).
    head_layers: int = 2

    def check(self, where: str) -> None:
        check_positive(self, where, "kmeans_iters", "kmeans_nredo", "max_points_per_centroid",
                       "rebuild_every_epochs", "head_layers")
        check_positive(self, where, "warmup_epochs", "num_neg_paths", "weight", "actor_num_cpus",
                       "actor_num_gpus", strict=False)
        check_choice(f"{where}.embedding", self.embedding, HIRL_EMBEDDINGS)
        check_choice(f"{where}.kmeans_init", self.kmeans_init, KMEANS_INITS)
        check_choice(f"{where}.neg_average", self.neg_average, NEG_AVERAGES)
        if not self.enabled:
            return
        k = self.num_clusters
        if not k:
            raise ConfigError(f"{where}.num_clusters must list one cluster count per level, "
                              "got []")
        for i, n in enumerate(k):
            if n < 2:
                raise ConfigError(f"{where}.num_clusters[{i}] must be >= 2, got {n}")
        for i in range(1, len(k)):
            if k[i] >= k[i - 1]:
                raise ConfigError(
                    f"{where}.num_clusters must strictly decrease per level, got {list(k)} "
                    f"(level {i} >= level {i - 1})")


OPTIMIZERS = ("sgd", "adamw", "lars")
#: ``train.on_nan``: what a step with a non-finite loss or gradient does.
ON_NAN = ("stop", "skip_step")
AMP_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and Ray Train workers. ``batch_size`` is global over workers."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    # The cosine schedule ends at this learning rate (DINO/BEiT recipes: 2e-6 / 1e-5).
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    # None: constant weight_decay; a number: cosine from weight_decay to it (DINO: 0.04 -> 0.4).
    weight_decay_end: float | None = None
    optimizer: str = "sgd"
    warmup_lr_epochs: int = 0
    num_workers: int = 2
    use_gpu: bool = False
    amp: bool = True
    # Mixed precision on a GPU: float16 (with a GradScaler, which reads its overflow check on
    # the host every step) or bfloat16 (Ampere/Hopper: float32's range, no scaler, no sync).
    amp_dtype: str = "float16"
    seed: int = 0
    cpus_per_worker: float = 1.0
    # GPUs each worker reserves when use_gpu (a fraction shares one GPU, e.g. with the actor).
    gpus_per_worker: float = 1.0
    max_failures: int = 0
    # Non-finite loss or gradients: stop (error naming the step; no checkpoint for that epoch)
    # or skip_step (the step changes nothing; counted in the epoch metric nan_skipped).
    on_nan: str = "stop"
    # skip_step: stop once this many steps in a row were non-finite.
    max_nan_skips: int = 10
    # Clip the global L2 norm of the gradients to this before the optimiser step (null: off).
    grad_clip: float | None = None
    # Joining a cluster (RAY_ADDRESS): seconds to wait for the workers' CPUs/GPUs (an
    # autoscaler adding nodes) before giving up with what was asked; 0 = wait for ever.
    resource_timeout_s: float = 1800.0
    # Rank 0's step-level progress (README "Watching a run"): a line at least this often when
    # the console is not a terminal (Ray worker logs, CI), and after every
    # progress_every_steps steps (0: by time only).
    progress_every_s: float = 30.0
    progress_every_steps: int = 0

    def check(self, where: str) -> None:
        check_positive(self, where, "epochs", "batch_size", "num_workers", "lr",
                       "cpus_per_worker", "gpus_per_worker", "max_nan_skips", "progress_every_s")
        check_positive(self, where, "weight_decay", "warmup_lr_epochs", "max_failures", "min_lr",
                       "resource_timeout_s", "progress_every_steps", strict=False)
        if self.min_lr > self.lr:
            raise ConfigError(f"{where}.min_lr ({self.min_lr}) must be <= {where}.lr "
                              f"({self.lr}): the cosine schedule decays from lr to min_lr")
        check_choice(f"{where}.optimizer", self.optimizer, OPTIMIZERS)
        check_choice(f"{where}.on_nan", self.on_nan, ON_NAN)
        check_choice(f"{where}.amp_dtype", self.amp_dtype, AMP_DTYPES)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"{where}.grad_clip must be a positive max gradient norm or null "
                              f"(no clipping), got {self.grad_clip}")
        if self.weight_decay_end is not None and self.weight_decay_end < 0:
            raise ConfigError(f"{where}.weight_decay_end must be >= 0 or null, "
                              f"got {self.weight_decay_end}")
        gpus = self.gpus_per_worker
        if gpus > 1 and gpus != int(gpus):
            raise ConfigError(f"{where}.gpus_per_worker must be a fraction <= 1 or a whole "
                              f"number, got {gpus}; Ray cannot split a request across GPUs")
        b, w = self.batch_size, self.num_workers
        if b % w:
            raise ConfigError(f"{where}.batch_size ({b}) is global and must be divisible by "
                              f"{where}.num_workers ({w}); use e.g. "
                              f"{where}.batch_size={b // w * w or w}")
        if b < w * 2:
            raise ConfigError(f"{where}.batch_size ({b}) is global and must give each of the "
                              f"{w} workers >= 2 samples")


#: Built-in evaluation protocols, in the order they run (``hirl_ray/eval/``).
DEFAULT_PROTOCOLS = ("knn", "clustering", "consistency")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on frozen backbone features (defaults fixed; see README).

    ``protocols``: names in ``PROTOCOLS``, run in order by the final evaluation.
    ``params``: ``{protocol: settings}``, each parsed into that protocol's own ``Config``
    dataclass (``eval.params.knn.k``); protocols not listed get their defaults, filled in here
    so a saved config records every setting. ``every_epochs``: online evaluation period during
    training (0 = only the final one); ``max_train_samples``: its kNN memory bank size (0 = all).
    """

    #: Keys of older configs (saved in checkpoints before protocols had settings) → new key.
    moved_keys: typing.ClassVar[Mapping[str, str]] = {
        "knn_k": "params.knn.k", "knn_temperature": "params.knn.temperature"}

    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS
    params: Mapping[str, Any] = field(default_factory=dict, metadata={"registry": PROTOCOLS})
    every_epochs: int = 0
    max_train_samples: int = 0

    def __post_init__(self) -> None:
        params = dict(self.params)
        for name in self.protocols:
            if name not in params and name in PROTOCOLS:
                params[name] = PROTOCOLS.get(name).Config()
        object.__setattr__(self, "protocols", tuple(self.protocols))
        object.__setattr__(self, "params", params)

    def check(self, where: str) -> None:
        check_positive(self, where, "every_epochs", "max_train_samples", strict=False)
        for name in self.protocols:
            check_choice(f"{where}.protocols", name, PROTOCOLS.names())
        if len(set(self.protocols)) != len(self.protocols):
            raise ConfigError(f"{where}.protocols lists a protocol twice: {list(self.protocols)}")
        for name in self.params:
            if name not in self.protocols:
                raise ConfigError(f"{where}.params.{name} is set but {name!r} is not in "
                                  f"{where}.protocols; add it there or drop the settings")


#: Epoch metrics a checkpoint always has (``storage.best_metric`` may name them without
#: online evaluation); others (``knn_acc/<level>``) need ``eval.every_epochs > 0``.
EPOCH_METRICS = ("loss", "ssl_loss", "semantic_loss")
BEST_MODES = ("max", "min")


@dataclass(frozen=True)
class StorageConfig:
    """Results root: ``path/name`` holds checkpoints, hierarchy snapshots and metrics.

    Retention (README "Reliability"): ``keep_checkpoints``/``keep_snapshots`` bound what a run
    leaves in its folder; the newest checkpoint, the best one by ``best_metric`` and every
    snapshot a kept checkpoint resumes with are never deleted.
    """

    path: str = "results"
    name: str = "default"
    # Newest epoch checkpoints kept (null: all); >= 2 leaves a fallback for a corrupted newest.
    keep_checkpoints: int | None = None
    # Newest hierarchy snapshots kept (null: all), besides those kept checkpoints resume with.
    keep_snapshots: int | None = None
    # An epoch metric (loss, knn_acc/<level>, ...) whose best checkpoint is kept besides the
    # newest keep_checkpoints (null: none).
    best_metric: str | None = None
    # Whether best_metric is best when highest (max) or lowest (min).
    best_mode: str = "max"

    def check(self, where: str) -> None:
        if "/" in self.name or not self.name:
            raise ConfigError(f"{where}.name must be a plain folder name, got {self.name!r}")
        for key in ("keep_checkpoints", "keep_snapshots"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{key} must be >= 1 or null (keep all), got {value}")
        check_choice(f"{where}.best_mode", self.best_mode, BEST_MODES)
        if self.best_metric is not None and not self.best_metric:
            raise ConfigError(f"{where}.best_metric must be a metric name (e.g. loss, "
                              "knn_acc/<level>) or null")


@dataclass(frozen=True)
class ObserveConfig:
    """What a fit writes for watching it (README "Watching a run"); console progress is
    ``train.progress_every_s``."""

    # TensorBoard event files in <run>/tensorboard (s3://: written locally, uploaded per epoch).
    tensorboard: bool = True
    # Step scalars (losses, lr, grad norm, throughput, data wait) every this many steps.
    every_steps: int = 20
    # status.json (read by `hirl-ray status RUN`) at least this often during an epoch.
    status_every_s: float = 30.0
    # ray.util.metrics gauges/counters (Ray dashboard, Prometheus), names hirl_ray_*.
    ray_metrics: bool = True
    # An MLflow run per fit (per trial in a sweep): the TensorBoard scalars, the tree picture
    # and the config as parameters (extra [mlflow]). Tracking URI "" = MLFLOW_TRACKING_URI.
    mlflow: bool = False
    mlflow_uri: str = ""
    mlflow_experiment: str = "hirl_ray"
    # A Weights & Biases run per fit (per trial): the same scalars (step ones against
    # global_step, epoch ones against epoch), the tree picture and the config (extra [wandb]).
    # Online/offline is W&B's own WANDB_MODE; entity "" = the API key's default entity.
    wandb: bool = False
    wandb_project: str = "hirl_ray"
    wandb_entity: str = ""

    def check(self, where: str) -> None:
        check_positive(self, where, "every_steps", "status_every_s")
        if self.mlflow and not self.mlflow_experiment:
            raise ConfigError(f"{where}.mlflow_experiment must not be empty with "
                              f"{where}.mlflow=true")
        if self.wandb and not self.wandb_project:
            raise ConfigError(f"{where}.wandb_project must not be empty with {where}.wandb=true")


def _default_method() -> MethodConfig:
    return METHODS.get(DEFAULT_METHOD).Config()


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment; build one with :func:`load_config`.

    ``sections``: the registered extra top-level sections present in the file (e.g. ``tune``),
    each parsed into its dataclass; read one with :meth:`section`.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=_default_method)
    hirl: HirlConfig = field(default_factory=HirlConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    observe: ObserveConfig = field(default_factory=ObserveConfig)
    sections: Mapping[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> str:
        """``storage.path/storage.name`` (a local path or a remote URI such as ``s3://…``)."""
        return f"{self.storage.path.rstrip('/')}/{self.storage.name}"

    def section(self, name: str) -> Any:
        """The parsed extra section ``name`` (e.g. ``"tune"``), or ``None`` when absent."""
        if name not in _EXTRA_SECTIONS:
            raise KeyError(f"no section {name!r} is registered")
        return self.sections.get(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe) that :func:`load_config` accepts back."""
        out = {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name != "sections"}
        out.update({k: to_plain(v) for k, v in self.sections.items()})
        return out


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "method": MethodConfig, "hirl": HirlConfig,
    "train": TrainConfig, "eval": EvalConfig, "storage": StorageConfig,
    "observe": ObserveConfig,
}
_EXTRA_SECTIONS: dict[str, type] = {}


def register_section(name: str, cls: type) -> type:
    """Add an optional top-level section (e.g. ``tune``) parsed into the dataclass ``cls``."""
    if name in SECTIONS or (name in _EXTRA_SECTIONS and _EXTRA_SECTIONS[name] is not cls
                            and _EXTRA_SECTIONS[name].__qualname__ != cls.__qualname__):
        raise ValueError(f"section {name!r} is already defined")
    _EXTRA_SECTIONS[name] = cls
    return cls


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings as plain dicts/lists (what YAML/JSON hold)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    return value


# ---- the loader ---------------------------------------------------------------------------

def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation; return it in the field's type."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for alternative in inner:
            try:
                return _coerce(key, value, alternative)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{key}: {value!r} is none of the accepted forms ({'; '.join(map(str, errors))})")
    if origin is tuple:
        if isinstance(value, (int, float, str, bool, Mapping)) or value is None:
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin in (Mapping, dict, typing.Mapping) or annotation in (Mapping, dict):
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        inner_type = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(f"{key}.{k}", v, inner_type) for k, v in value.items()}
    if annotation is MethodConfig:
        return build_method_section(key, value)
    if dataclasses.is_dataclass(annotation):
        return build(key, annotation, value)
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


def build(where: str, cls: type, raw: Any) -> Any:
    """Build the dataclass ``cls`` from ``raw`` (a mapping or ``None``), strictly.

    Unknown keys and wrong types raise ``ConfigError`` naming ``where.key``; nested dataclass
    fields recurse; ``cls.check(where)`` runs on the result when it defines one.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys, got {raw!r}")
    raw = _move_keys(where, raw, getattr(cls, "moved_keys", {}))
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in raw:
        if k not in fields:
            raise ConfigError(f"unknown key {where}.{k}; valid keys: {', '.join(sorted(fields))}")
    values = {}
    for k, v in raw.items():
        registry = fields[k].metadata.get("registry")
        values[k] = (build_by_name(f"{where}.{k}", registry, v) if registry is not None
                     else _coerce(f"{where}.{k}", v, hints[k]))
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if callable(check):
        check(where)
    return obj


def _move_keys(where: str, raw: Mapping[str, Any], moved: Mapping[str, str]) -> Mapping[str, Any]:
    """``raw`` with renamed keys (``old -> "a.b"``) at their new nested place, with a warning."""
    if not any(k in raw for k in moved):
        return raw
    out = {k: v for k, v in raw.items() if k not in moved}
    for old, new in moved.items():
        if old not in raw:
            continue
        *parents, last = new.split(".")
        node = out
        for p in parents:
            child = node.get(p)
            if child is not None and not isinstance(child, Mapping):
                raise ConfigError(f"{where}.{p} must be a mapping of keys, got {child!r}")
            node[p] = node = dict(child or {})
        if last in node:
            raise ConfigError(f"{where}.{old} and {where}.{new} are both set; keep only {new}")
        node[last] = raw[old]
        log.warning("%s.%s is deprecated; use %s.%s", where, old, where, new)
    return out


def build_by_name(where: str, registry: Registry, raw: Any) -> dict[str, Any]:
    """``{name: settings}`` with every name in ``registry``, each built into its ``Config``.

    For a field declared ``field(metadata={"registry": R})`` (e.g. ``eval.params``): an entry
    brings its own settings dataclass, so a new entry needs no edit here.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of names to settings, got {raw!r}")
    out = {}
    for name, value in raw.items():
        if name not in registry:
            raise ConfigError(f"unknown key {where}.{name}; registered {registry.key}: "
                              f"{', '.join(registry.names())}")
        out[str(name)] = build(f"{where}.{name}", registry.get(name).Config, value)
    return out


def build_method_section(where: str, raw: Any) -> MethodConfig:
    """The ``method:`` section as the dataclass of the method ``raw["name"]`` names."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys, got {raw!r}")
    name = raw.get("name", DEFAULT_METHOD)
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name must be a string, got {name!r}")
    cls = METHODS.get(name).Config
    return build(where, cls, {**raw, "name": name})


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Every check of the loader on a config built in code (returns the checked copy)."""
    return from_dict(cfg.to_dict(), source="config")


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
        if k not in SECTIONS and k not in _EXTRA_SECTIONS:
            raise ConfigError(f"{source}: unknown section {k!r}; valid sections: "
                              f"{', '.join([*SECTIONS, *_EXTRA_SECTIONS])}")
    sections = {name: _coerce(name, merged.get(name), cls) if cls is MethodConfig
                else build(name, cls, merged.get(name)) for name, cls in SECTIONS.items()}
    extra = {name: build(name, cls, merged[name]) for name, cls in _EXTRA_SECTIONS.items()
             if name in merged}
    cfg = ExperimentConfig(**sections, sections=extra)
    _check_across_sections(cfg)
    return cfg


def _check_across_sections(cfg: ExperimentConfig) -> None:
    """Checks that read more than one section (each section checked itself already)."""
    emb = cfg.hirl.embedding
    if emb.startswith("vit_") and not cfg.model.is_vit:
        raise ConfigError(f"hirl.embedding={emb} needs a ViT backbone (model.backbone: vit_tiny "
                          f"or vit_b_16), got {cfg.model.backbone}; use projection for CNNs")
    method_cls = METHODS.get(cfg.method.name)
    supported = getattr(method_cls, "embeddings", HIRL_EMBEDDINGS)
    if emb not in supported:
        raise ConfigError(f"hirl.embedding={emb} is not produced by method {cfg.method.name}; "
                          f"choose one of {', '.join(supported)}")
    if getattr(method_cls, "needs_vit", False) and not cfg.model.is_vit:
        raise ConfigError(f"method {cfg.method.name} masks patch tokens and needs a ViT "
                          f"backbone (model.backbone: vit_tiny or vit_b_16), got "
                          f"{cfg.model.backbone}")
    if cfg.data.augment_on == "gpu" and not cfg.train.use_gpu:
        raise ConfigError("data.augment_on=gpu makes the views on the workers' GPUs and needs "
                          "train.use_gpu=true; set it, or use data.augment_on=cpu")
    check = getattr(cfg.method, "check_experiment", None)
    if check is not None:
        check(cfg)  # a method's own cross-section checks (e.g. crop sizes vs patch size)
    best = cfg.storage.best_metric
    if best is not None and best not in EPOCH_METRICS and cfg.eval.every_epochs == 0:
        raise ConfigError(
            f"storage.best_metric={best!r} is only measured by the online evaluation; set "
            f"eval.every_epochs > 0, or use one of {', '.join(EPOCH_METRICS)} (best_mode=min)")
    if cfg.hirl.enabled and cfg.hirl.warmup_epochs >= cfg.train.epochs:
        raise ConfigError(
            f"hirl.warmup_epochs ({cfg.hirl.warmup_epochs}) must be < train.epochs "
            f"({cfg.train.epochs}), or HIRL never starts; lower it or set hirl.enabled=false")


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
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {what}; fix the file") from None
    return from_dict(raw, overrides, source=str(path))
