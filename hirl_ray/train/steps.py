"""The Ray-free steps of a training worker (:func:`hirl_ray.train.ray_worker.train_worker`).

Data loaders from the method's views, the model and its optimiser, one epoch with the run's
schedules, the epoch's metrics and rank 0's online evaluation; plus the import of the modules
that register a config's method, which a worker needs before it can parse the config.
Nothing here imports Ray: the worker function calls these between its Ray touch-points.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from hirl_ray.config import BACKBONES, DATASETS, METHODS, PROTOCOLS, ExperimentConfig
from hirl_ray.data import ViewDataset, build_dataset, eval_transform
from hirl_ray.data.device_views import DecodeFixed, DeviceViews, decode_size
from hirl_ray.data.ingest import index_coverage
from hirl_ray.eval.report import run_evaluation
from hirl_ray.methods.distributed import convert_sync_batchnorm, world_size
from hirl_ray.methods.hirl import HirlModel
from hirl_ray.train.loop import EpochStats, HierarchySource, train_epoch, unwrap
from hirl_ray.train.numerics import NanGuard
from hirl_ray.train.optim import build_optimizer

#: Steps between checks for a finished rebuild (each is a host-synchronising agreement).
HIERARCHY_POLL_EVERY = 8


@dataclass
class WorkerRun:
    """The parts of one rank's training, filled in step by step by the worker function.

    :func:`build_parts` makes the model, optimiser, AMP scaler, negative-path generator and
    the non-finite guard (``train.on_nan``, ``train.grad_clip``); the worker adds the training
    set, the loaders, the DDP wrapper and the hierarchy source.
    """

    cfg: ExperimentConfig
    rank: int
    world: int
    device: torch.device
    model: HirlModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator
    guard: NanGuard
    train_set: Any = None
    loader: Any = None
    feature_loader: Any = None
    ddp: nn.Module | None = None
    hierarchy: HierarchySource | None = None
    #: data.augment_on=gpu: makes the views from the loader's decoded batch on the device.
    augment: DeviceViews | None = None

    amp_dtype: torch.dtype | None = None
    observer: Any = None  # rank 0's RunObserver (hirl_ray.train.observe); None elsewhere
    tree_sample: Any = None  # rank 0: (features, indices) kept from the last rebuild
    #: ``(N,)`` how often this rank trained on each index in the last epoch.
    index_counts: torch.Tensor | None = None

    @property
    def use_amp(self) -> bool:
        """Mixed precision: ``train.amp`` on a CUDA device."""
        return self.amp_dtype is not None


# ---- the modules that register the config's names ----------------------------------------

def registering_modules(cfg: ExperimentConfig) -> list[str]:
    """Modules defining ``cfg``'s method (class and Config), backbone, dataset and protocols.

    A Ray worker parses the config from a plain dict, so a method registered outside
    ``hirl_ray`` (a user's module, a test file) must be imported there first. The module must
    be importable in the worker (not ``__main__``): Ray's local workers share the driver's
    ``sys.path``; on a cluster, ship it (``runtime_env``).
    """
    entries = (METHODS.get(cfg.method.name), type(cfg.method), BACKBONES.get(cfg.model.backbone),
               DATASETS.get(cfg.data.name), *(PROTOCOLS.get(p) for p in cfg.eval.protocols))
    out: list[str] = []
    for entry in entries:
        module = getattr(entry, "__module__", None)
        if module and module != "__main__" and module not in out:
            out.append(module)
    return out


def import_modules(names: Iterable[str]) -> None:
    """Import each module (its ``@register_method`` / ``register_backbone`` calls run)."""
    for name in names:
        importlib.import_module(name)


def call_with_modules(modules: Iterable[str], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` after :func:`import_modules` (for Ray tasks that parse a saved config)."""
    import_modules(modules)
    return fn(*args)


# ---- data -------------------------------------------------------------------------------

def train_views(cfg: ExperimentConfig, method: Any, train_set: Any, rank: int
                ) -> tuple[Callable[[Any], Any], DeviceViews | None]:
    """The loader's per-image transform and, with ``data.augment_on=gpu``, the device side.

    ``cpu``: the method's views (``method.transform(cfg.data)``), nothing on the device.
    ``gpu``: the loader only decodes (:class:`~hirl_ray.data.device_views.DecodeFixed`) and
    :class:`~hirl_ray.data.device_views.DeviceViews` makes the same views batched on the device
    (its own random stream per rank, from ``train.seed``).
    """
    transform = method.transform(cfg.data)
    if cfg.data.augment_on != "gpu":
        return transform, None
    device_views = DeviceViews(transform, seed=cfg.train.seed * 1000 + 500 + rank)
    return DecodeFixed(decode_size(train_set, transform)), device_views


def build_train_loader(cfg: ExperimentConfig, train_set, transform: Callable[[Any], Any],
                       rank: int, world: int) -> DataLoader:
    """This rank's loader of ``transform``'s views, ``train.batch_size / world`` per step.

    The DistributedSampler is ours, seeded with ``train.seed`` so the seed changes the data
    order (``prepare_data_loader`` keeps a loader that already has one; the sampler it would
    add uses seed 0). The sampler pads to equal shares and ``drop_last`` drops a ragged last
    batch, so every rank takes the same number of equal-sized steps, which the gathers in
    the methods need. ``set_epoch`` reshuffles each epoch.
    """
    views = ViewDataset(train_set, transform)
    sampler = DistributedSampler(views, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.train.seed)
    return DataLoader(views, batch_size=cfg.train.batch_size // world, sampler=sampler,
                      drop_last=True, num_workers=cfg.data.loader_workers,
                      persistent_workers=cfg.data.loader_workers > 0,
                      pin_memory=cfg.train.use_gpu)  # page-locked: async host→GPU copies


def build_feature_loader(cfg: ExperimentConfig, train_set, world: int) -> DataLoader:
    """Un-augmented training images, in order, for the features a rebuild clusters."""
    plain = ViewDataset(train_set, eval_transform(cfg.data.image_size))
    return DataLoader(plain, batch_size=max(cfg.train.batch_size // world, 256), shuffle=False,
                      num_workers=cfg.data.loader_workers, pin_memory=cfg.train.use_gpu)


# ---- model and optimiser ---------------------------------------------------------------

def build_parts(cfg: ExperimentConfig, rank: int, world: int, device: torch.device) -> WorkerRun:
    """``HirlModel.from_config`` on ``device`` (SyncBN when asked), optimiser, AMP scaler."""
    model = HirlModel.from_config(cfg)  # hirl.embedding, hirl.neg_average, heads per level
    if cfg.model.sync_bn and world > 1:
        model = convert_sync_batchnorm(model, device.type)  # before DDP; same state_dict
    model = model.to(device)
    # skip_step undoes a bad step on the device: Adam's step counter must live there too.
    capturable = cfg.train.on_nan == "skip_step" and device.type == "cuda"
    optimizer = build_optimizer(model.param_groups(), cfg.train, capturable=capturable)
    use_amp = cfg.train.amp and device.type == "cuda"
    amp_dtype = getattr(torch, cfg.train.amp_dtype) if use_amp else None
    # bfloat16 has float32's exponent range: no loss scaling (and no per-step host read).
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    # Negative-path sampling, one stream per rank, continued across epochs.
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank)
    guard = NanGuard(model, optimizer, device, policy=cfg.train.on_nan,
                     max_skips=cfg.train.max_nan_skips, grad_clip=cfg.train.grad_clip)
    return WorkerRun(cfg, rank, world, device, model, optimizer, scaler, generator, guard,
                     amp_dtype=amp_dtype)


# ---- one epoch, its metrics, online evaluation ---------------------------------------------

class IndexCounter:
    """Passes a loader's ``(views, index)`` batches through, counting each index seen.

    ``counts``: ``(num_samples,)`` int32 on the batches' device (one ``index_add_`` per step,
    no host sync); summed over ranks by :func:`epoch_metrics` (``index_missed``,
    ``index_repeats``).
    """

    def __init__(self, loader: Iterable, num_samples: int) -> None:
        self.loader = loader
        self.num_samples = num_samples
        self.counts: torch.Tensor | None = None

    def __iter__(self):
        for views, index in self.loader:
            if self.counts is None:
                self.counts = torch.zeros(self.num_samples, dtype=torch.int32,
                                          device=index.device)
            self.counts.index_add_(0, index.to(self.counts.device),
                                   torch.ones_like(index, dtype=torch.int32,
                                                   device=self.counts.device))
            yield views, index


def train_one_epoch(run: WorkerRun, epoch: int, step: int) -> tuple[EpochStats, int]:
    """:func:`~hirl_ray.train.loop.train_epoch` with the run's schedules; the new step."""
    cfg = run.cfg
    if hasattr(run.loader, "sampler") and hasattr(run.loader.sampler, "set_epoch"):
        run.loader.sampler.set_epoch(epoch)
    steps_per_epoch = len(run.loader)
    if run.observer is not None:
        run.observer.begin_epoch(epoch, steps_per_epoch)
    counter = IndexCounter(run.loader, len(run.train_set))
    out = train_epoch(run.ddp, counter, run.optimizer, epoch=epoch, step=step,
                      total_steps=steps_per_epoch * cfg.train.epochs, base_lr=cfg.train.lr,
                      warmup_steps=steps_per_epoch * cfg.train.warmup_lr_epochs,
                      hierarchy=run.hierarchy, device=run.device, scaler=run.scaler,
                      amp_dtype=run.amp_dtype, generator=run.generator,
                      poll_every=HIERARCHY_POLL_EVERY,
                      weight_decay=(cfg.train.weight_decay, cfg.train.weight_decay_end),
                      guard=run.guard, min_lr=cfg.train.min_lr, augment=run.augment,
                      observer=run.observer, steps_per_epoch=steps_per_epoch)
    run.index_counts = counter.counts
    return out


def index_counts_all_ranks(run: WorkerRun) -> dict[str, int]:
    """:func:`~hirl_ray.data.ingest.index_coverage` of the last epoch over every rank (a
    collective: one all-reduce of ``N`` int32)."""
    n = len(run.train_set)
    counts = run.index_counts if run.index_counts is not None else torch.zeros(n, dtype=torch.int32)
    counts = counts.to(run.device)
    if world_size() > 1:
        dist.all_reduce(counts)
    return index_coverage(counts)


def bad_files_skipped(dataset: Any, device: torch.device) -> int:
    """Distinct training files skipped as unreadable (``data.on_bad_file=skip``), all ranks.

    Each rank's dataset marks the files its loaders (and their worker processes) could not
    read; the union over ranks counts a file once however many ranks met it. A collective:
    every rank calls it. Costs one scalar all-reduce when no rank skipped anything.
    """
    mask = dataset.bad_file_mask() if hasattr(dataset, "bad_file_mask") else None
    local = torch.zeros((), dtype=torch.long) if mask is None else mask.sum(dtype=torch.long)
    if world_size() == 1:
        return int(local)
    anyone = local.to(device)
    dist.all_reduce(anyone, op=dist.ReduceOp.MAX)
    if int(anyone) == 0 or mask is None:  # every rank has the same dataset type
        return 0
    union = mask.to(device=device, dtype=torch.int32)
    dist.all_reduce(union, op=dist.ReduceOp.MAX)
    return int(union.sum())


def epoch_metrics(run: WorkerRun, stats: EpochStats, attempt: int) -> dict[str, Any]:
    """What every rank reports after an epoch (rank 0's also go into the checkpoint).

    ``attempt``: the worker group's incarnation (``ResumePlan.attempt``), saved for a resume.
    ``nan_skipped``: this epoch's non-finite steps; ``bad_files_skipped``: unreadable files
    skipped since the workers started (all ranks; ``data/bad_files_skipped`` in metrics.json);
    ``index_missed`` / ``index_repeats``: training indices not trained on this epoch, and
    extra visits (both 0: every index exactly once, all ranks).
    """
    pending = getattr(run.hierarchy, "pending_round", None)  # a HierarchyClient's open round
    return {"epoch": stats.epoch + 1, "loss": stats.loss, "ssl_loss": stats.method_loss,
            "semantic_loss": stats.semantic_loss if stats.semantic_loss is not None
            else float("nan"), "hirl_active": stats.semantic_steps > 0,
            "hierarchy_version": stats.hierarchy_version, "lr": stats.lr,
            "hierarchy_building": pending is not None,
            # For a resume: which round to redo (-1: none) and by which attempt.
            "hierarchy_pending_round": -1 if pending is None else pending,
            "hierarchy_attempt": attempt,
            "samples_per_s": stats.samples_per_s * run.world, "epoch_s": stats.seconds,
            "nan_skipped": stats.nan_skipped,
            "bad_files_skipped": bad_files_skipped(run.train_set, run.device),
            **index_counts_all_ranks(run)}


def is_eval_epoch(completed: int, cfg: ExperimentConfig) -> bool:
    """Periodic evaluation every ``eval.every_epochs`` (0 = only the final one, on the driver)."""
    every = cfg.eval.every_epochs
    return every > 0 and (completed % every == 0 or completed == cfg.train.epochs)


def online_eval_inputs(cfg: ExperimentConfig, train_set) -> dict[str, Any]:
    """Loaders and labels for rank 0's periodic kNN/NMI (features stay on CPU).

    With ``data.loader=ray_data`` an ``s3://`` test split is read object by object, as the
    training split, not downloaded to rank 0's node.
    """
    test_set = build_dataset(cfg.data, "test", local_copy=cfg.data.loader != "ray_data")
    tf = eval_transform(cfg.data.image_size)
    train_view: Any = ViewDataset(train_set, tf)
    if cfg.eval.max_train_samples and cfg.eval.max_train_samples < len(train_set):
        # A fixed, seeded subset: the same samples every epoch, comparable across trials.
        g = torch.Generator().manual_seed(cfg.train.seed)
        keep = torch.randperm(len(train_set), generator=g)[:cfg.eval.max_train_samples]
        train_view = Subset(train_view, keep.tolist())
    return {"train_loader": DataLoader(train_view, batch_size=256),
            "test_loader": DataLoader(ViewDataset(test_set, tf), batch_size=256),
            "train_labels": train_set.labels, "test_labels": test_set.labels,
            "level_names": train_set.level_names}


def online_eval(run: WorkerRun, inputs: dict[str, Any]) -> dict[str, float]:
    """``eval.protocols`` on the current backbone (and hierarchy); keys as in the final
    evaluation (``knn_acc/superclass``). Protocols that fine-tune the backbone
    (``needs_backbone``) run only in the final evaluation: minutes each, and on a copy."""
    hierarchy = run.hierarchy.current if run.hierarchy is not None else None
    frozen = tuple(p for p in run.cfg.eval.protocols if not PROTOCOLS.get(p).needs_backbone)
    eval_cfg = dataclasses.replace(run.cfg.eval, protocols=frozen)
    return run_evaluation(unwrap(run.ddp).embed, eval_cfg, device=run.device,
                          seed=run.cfg.train.seed, hierarchy=hierarchy,
                          cluster_sizes=run.cfg.hirl.num_clusters, **inputs)
