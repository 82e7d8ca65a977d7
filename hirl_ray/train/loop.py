"""Framework-free training loop: one epoch of steps, rebuild timing.

Nothing here knows about Ray. The worker function in ``ray_worker.py`` wires these
pieces to Ray Train; tests and benchmarks drive them directly. The schedules are plain
functions of progress (:mod:`hirl_ray.schedules`), the optimiser comes from the method's
parameter groups (:mod:`hirl_ray.train.optim`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from hirl_ray.config import HirlConfig
from hirl_ray.hierarchy import PrototypeHierarchy
from hirl_ray.schedules import cosine_lr, weight_decay_schedule
from hirl_ray.train.numerics import NanGuard, injected_nan_step
from hirl_ray.train.optim import apply_schedule

__all__ = ["EpochStats", "HierarchySource", "StaticHierarchy", "StepObserver", "StepView",
           "cosine_lr", "format_epoch", "is_rebuild_epoch", "train_epoch", "unwrap"]


class HierarchySource(Protocol):
    """Where the training loop gets the prototype hierarchy from.

    ``poll()`` is called once per step and must be cheap; it may switch to a newer
    version. ``current`` is ``None`` until the first hierarchy exists (warm-up).
    """

    @property
    def current(self) -> PrototypeHierarchy | None: ...

    def poll(self) -> None: ...


class StaticHierarchy:
    """A fixed hierarchy (or none): for tests, benchmarks and HIRL-off runs."""

    def __init__(self, hierarchy: PrototypeHierarchy | None = None) -> None:
        self.current = hierarchy

    def poll(self) -> None:
        """Nothing to refresh."""


@dataclass(frozen=True)
class StepView:
    """What one finished step offers its observers (progress, TensorBoard, metrics).

    ``losses`` (``[loss, ssl, semantic]``) and ``grad_norm`` are device tensors: an observer
    reads them (a host sync on a GPU) only on the steps it shows them. ``data_s``: time the
    host waited for the batch; ``compute_s``: host time of the rest of the step (on a GPU the
    time to queue the work, which equals the GPU time once the queue is full).
    """

    epoch: int
    step: int  # global steps done
    steps: int  # steps done this epoch
    steps_per_epoch: int
    total_steps: int
    samples: int  # samples this rank trained on this epoch
    losses: torch.Tensor
    semantic: bool
    lr: float
    data_s: float
    compute_s: float
    grad_norm: torch.Tensor | None = None


class StepObserver(Protocol):
    """Called after every step; must be cheap unless it decides to show something."""

    def on_step(self, view: StepView) -> None: ...


@dataclass(frozen=True)
class EpochStats:
    """Averages over one epoch on one worker."""

    epoch: int
    loss: float
    method_loss: float
    semantic_loss: float | None
    semantic_steps: int
    steps: int
    samples: int
    seconds: float
    lr: float
    hierarchy_version: int
    #: Steps with a non-finite loss or gradient this epoch (skipped under train.on_nan=skip_step).
    nan_skipped: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def is_rebuild_epoch(completed_epochs: int, hirl: HirlConfig, total_epochs: int) -> bool:
    """Whether the hierarchy is rebuilt once ``completed_epochs`` epochs are done.

    First build when warm-up ends, then every ``rebuild_every_epochs``; never after the
    last epoch (nothing would train with it). ``completed_epochs == 0`` with no warm-up
    means: build from the initial network before the first step.
    """
    if not hirl.enabled or completed_epochs >= total_epochs:
        return False
    since = completed_epochs - hirl.warmup_epochs
    return since >= 0 and since % hirl.rebuild_every_epochs == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move an image batch to ``device``; on CPU as channels-last.

    oneDNN's CPU convolutions (forward and, above all, backward) run faster on NHWC inputs:
    -17% step time for the default experiment (``experiments/bench``, profile: fewer layout
    reorders in ``convolution_backward``). The model's weights stay as they are, so DDP
    buckets and checkpoints are unaffected; the numbers are the same up to rounding.
    """
    images = images.to(device, non_blocking=True)
    if device.type == "cpu" and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *,
                epoch: int, step: int, total_steps: int, base_lr: float, warmup_steps: int,
                hierarchy: HierarchySource, device: torch.device,
                scaler: torch.amp.GradScaler | None = None,
                amp_dtype: torch.dtype | None = None,
                generator: torch.Generator | None = None,
                max_steps: int | None = None, poll_every: int = 1,
                weight_decay: tuple[float, float | None] | None = None,
                guard: NanGuard | None = None, min_lr: float = 0.0,
                augment: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
                observer: StepObserver | None = None,
                steps_per_epoch: int | None = None) -> tuple[EpochStats, int]:
    """Run one epoch of SSL (+ HIRL) steps; returns the stats and the new global step.

    ``model`` is a :class:`~hirl_ray.methods.hirl.HirlModel`, possibly DDP-wrapped, and is
    called through its wrapper so DDP synchronises gradients. ``hierarchy.poll()`` runs on
    global steps divisible by ``poll_every`` (the same steps on every rank): while a rebuild is
    pending a poll is a cross-rank agreement whose result the host must read, so polling every
    step would stall a GPU's queue of work each step; a new hierarchy can wait a few steps.

    Each step (DINO's ``train_one_epoch`` order): schedules (and the method's
    ``on_step_start(step, epoch, progress)`` hook) → forward → backward → (AMP:
    unscale) → ``after_backward(step, epoch)`` hook → optimiser step → ``update_target``.
    The learning rate of every group follows :func:`~hirl_ray.schedules.cosine_lr` (times its
    ``lr_scale``; ``fixed_lr`` groups keep ``base_lr``), down to ``min_lr`` at the end.
    ``weight_decay``: ``(train.weight_decay, train.weight_decay_end)``; with an end value the
    groups without their own weight decay follow a cosine between the two; ``None`` or no end
    value leaves every group's weight decay as built.

    Mixed precision (CUDA only): ``amp_dtype`` is the autocast dtype; a ``scaler`` alone means
    float16 with loss scaling; bfloat16 needs no scaler (``train.amp_dtype``).

    ``guard`` (:class:`~hirl_ray.train.numerics.NanGuard`, default: ``train.on_nan=stop`` without
    clipping) flags non-finite steps on the device, clips the gradients after AMP's unscale
    and before the hook, and restores a skipped step after ``update_target``; the host reads its
    counters every ``guard.check_every`` steps and at the end, where it may raise
    :class:`~hirl_ray.train.numerics.NonFiniteError`. Skipped steps are left out of the averages.

    ``augment`` (``data.augment_on=gpu``: a :class:`~hirl_ray.data.device_views.DeviceViews`)
    turns the loader's decoded batch, once on the device, into the method's views.

    ``observer`` (rank 0's :class:`~hirl_ray.train.observe.RunObserver`) gets a
    :class:`StepView` after each step; ``steps_per_epoch`` (default ``len(loader)``) is what
    its progress counts towards.
    """
    model.train()
    inner = unwrap(model)
    # Autocast in amp_dtype (float16 when only a scaler is given); the scaler only for float16.
    autocast_dtype = amp_dtype or (torch.float16 if scaler is not None else None)
    use_autocast = autocast_dtype is not None and device.type == "cuda"
    use_amp = scaler is not None and device.type == "cuda"
    # Loss sums stay on the device: reading a CUDA scalar (float(), .item()) blocks the host until
    # the GPU has finished the step, so per-step reads would serialise the input pipeline and the
    # GPU. One read at the end of the epoch.
    # loss, method loss, semantic loss, good steps, good steps with a semantic loss
    totals = torch.zeros(5, device=device)
    steps = samples = semantic_steps = 0
    guard = guard if guard is not None else NanGuard(inner, optimizer, device)
    guard.begin_epoch()
    nan_step = injected_nan_step()  # test hook (fault injection); None in real runs
    lr = base_lr
    start = time.perf_counter()
    per_epoch = steps_per_epoch if steps_per_epoch is not None else _len_or_zero(loader)
    batches = iter(loader)
    while True:
        waited = time.perf_counter()
        try:
            views, index = next(batches)
        except StopIteration:
            break
        got = time.perf_counter()
        if step % poll_every == 0:
            hierarchy.poll()
        h = hierarchy.current
        lr = cosine_lr(base_lr, step, total_steps, warmup_steps, min_lr)
        wd = None
        if weight_decay is not None and weight_decay[1] is not None:
            wd = weight_decay_schedule(weight_decay[0], weight_decay[1], step / total_steps)
        apply_schedule(optimizer, lr, base_lr, wd)
        views = [_to_device(v, device) for v in views]
        if augment is not None:  # data.augment_on=gpu: the views are made here, batched
            views = [_to_device(v, device) for v in augment(views)]
        index = index.to(device, non_blocking=True)
        if step == nan_step:
            views[0] = torch.full_like(views[0], float("nan"))
        guard.before_forward()
        if hasattr(inner, "on_step_start"):
            inner.on_step_start(step, epoch, step / total_steps)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
            out = model(views, index, h, generator)
        optimizer.zero_grad(set_to_none=True)
        if use_amp:
            scaler.scale(out.loss).backward()
        else:
            out.loss.backward()
        if out.semantic_loss is None and hasattr(inner, "drop_head_grads"):
            # Warm-up: the heads were unused; leave them exactly as they are (official HIRL),
            # not moved by weight decay or momentum through their zero (DDP) gradients.
            inner.drop_head_grads()
        if use_amp:
            scaler.unscale_(optimizer)  # the hook sees (and may clip) the real gradients
        guard.after_backward(out.loss, amp=use_amp)  # flag non-finite; train.grad_clip
        if hasattr(inner, "after_backward"):
            inner.after_backward(step, epoch)
        if use_amp:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        inner.method.update_target(min(1.0, (step + 1) / total_steps))
        guard.after_step(step)  # skip_step: a bad step is undone here
        step += 1
        steps += 1
        samples += index.shape[0]
        semantic = out.semantic_loss
        good = guard.good
        if semantic is not None:
            semantic_steps += 1
            semantic_good = good
        else:
            semantic, semantic_good = totals.new_zeros(()), totals.new_zeros(())
        losses = torch.stack([out.loss.detach(), out.method_loss, semantic.detach()]).float()
        totals += torch.cat([guard.masked(losses), torch.stack([good, semantic_good])])
        if guard.due(steps):
            guard.check(epoch)
        if observer is not None:
            observer.on_step(StepView(
                epoch=epoch, step=step, steps=steps, steps_per_epoch=per_epoch,
                total_steps=total_steps, samples=samples, losses=losses,
                semantic=out.semantic_loss is not None, lr=lr, data_s=got - waited,
                compute_s=time.perf_counter() - got, grad_norm=guard.last_norm))
        if max_steps is not None and steps >= max_steps:
            break
    if steps == 0:
        raise RuntimeError("the training loader yielded no batch: train.batch_size is larger "
                           "than the worker's share of the dataset; lower train.batch_size")
    nan_skipped = guard.check(epoch)  # raises under train.on_nan=stop
    current = hierarchy.current
    # The epoch's one read of the losses; a skipped step's are not in the sums.
    loss_sum, method_sum, semantic_sum, good_steps, good_semantic = totals.tolist()
    stats = EpochStats(
        epoch=epoch, loss=loss_sum / good_steps if good_steps else float("nan"),
        method_loss=method_sum / good_steps if good_steps else float("nan"),
        semantic_loss=semantic_sum / good_semantic if good_semantic else None,
        semantic_steps=semantic_steps, steps=steps, samples=samples,
        seconds=time.perf_counter() - start, lr=lr,
        hierarchy_version=current.version if current is not None else 0,
        nan_skipped=nan_skipped)
    return stats, step


def _len_or_zero(loader: Iterable) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return 0


def format_epoch(stats: EpochStats, total_epochs: int, world_size: int,
                 hierarchy: PrototypeHierarchy | None, building: bool,
                 hirl_enabled: bool = True) -> str:
    """One concise progress line (rank 0 prints it)."""
    sem = f"{stats.semantic_loss:.3f}" if stats.semantic_loss is not None else "—(warm-up)"
    if not hirl_enabled:
        sem, hier = "off", "off (hirl.enabled=false)"
    elif hierarchy is not None:
        hier = f"v{hierarchy.version} {'/'.join(map(str, hierarchy.num_clusters))}"
    else:
        hier = "none yet"
    if building:
        hier += " (rebuilding)"
    return (f"epoch {stats.epoch + 1:>3}/{total_epochs} | loss {stats.loss:.3f} "
            f"| ssl {stats.method_loss:.3f} | semantic {sem} | hierarchy {hier} "
            f"| {stats.samples_per_s * world_size:,.0f} samples/s | {stats.seconds:.1f}s")
