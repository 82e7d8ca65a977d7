"""Non-finite losses and gradients: found on the device every step, acted on without a host sync.

:class:`NanGuard` runs inside :func:`~hirl_ray.train.loop.train_epoch`. Every step it folds
``isfinite(loss)`` and ``isfinite(‖grad‖)`` into a device flag and device counters; the host
reads them only every ``check_every`` steps and at the end of the epoch (one small read), so a
GPU's queue of work never drains for the check. What a bad step does is ``train.on_nan``:

* ``stop``: nothing is masked; at the next read the run stops with :class:`NonFiniteError`
  naming the first bad step. The epoch is not reported, so no checkpoint holds the damaged
  weights and the last good checkpoint stays the newest.
* ``skip_step``: the step changes nothing. The model's parameters and buffers (target/EMA
  networks, MoCo queue, BatchNorm statistics) and the optimiser state are copied before the
  forward and put back with ``torch.where`` after ``update_target``, so whether a step counts
  is decided on the device. The cost: one extra copy of the model and optimiser state in memory
  and about two copies of it per step. ``train.max_nan_skips`` bad steps in a row stop the run.

Under AMP (CUDA) an overflow of the *scaled* gradients is the GradScaler's business (it skips
that step and lowers the scale), so there only a non-finite loss counts as a bad step.
Clipping (``train.grad_clip``) uses the same gradient norm: after AMP's unscale, before the
method's ``after_backward`` hook (DINO's order: ``clip_gradients`` then
``cancel_gradients_last_layer``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hirl_ray.config import ON_NAN, RunStopped
from hirl_ray.methods.distributed import world_size

#: Steps between the host's reads of the non-finite counters (plus one at the end of an epoch).
CHECK_EVERY = 50

# Slots of the device counter vector (one host read gets them all).
_BAD, _STREAK, _FIRST_BAD, _LIMIT = range(4)


#: Test hook (fault injection only, ``experiments/reliability``): a global step number.
NAN_STEP_ENV = "HIRL_RAY_FAULT_NAN_STEP"


def injected_nan_step() -> int | None:
    """The global step whose input batch a fault-injection test turns into NaN, or ``None``.

    A test hook, read only here: ``HIRL_RAY_FAULT_NAN_STEP`` is unset in every real run (it is
    in no config and no document tells users to set it). It exists so that a whole ``hirl-ray
    fit`` (Ray workers included: they inherit the driver's environment) can be shown to stop,
    or skip the step, on a NaN at a known place (``experiments/reliability/fault_injection.py``).
    """
    value = os.environ.get(NAN_STEP_ENV, "").strip()
    return int(value) if value else None


class NonFiniteError(RunStopped):
    """Training met a non-finite loss or gradient (``train.on_nan``); the message says where."""


def grad_norm(parameters: Iterable[nn.Parameter], max_norm: float | None = None) -> Tensor:
    """Global L2 norm of the gradients (a device scalar); clips them to ``max_norm`` if given.

    ``torch.nn.utils.clip_grad_norm_`` without a host read; the norm is the one before
    clipping. Parameters without a gradient are left out; none at all gives 0.
    """
    every = list(parameters)
    params = [p for p in every if p.grad is not None]
    if not params:
        return torch.zeros((), device=every[0].device if every else None)
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


class NanGuard:
    """Device-side detection of non-finite steps for one rank, kept across epochs.

    Args:
        model: The (unwrapped) model whose parameters and buffers a skipped step restores.
        optimizer: Its optimiser; its state is restored too.
        device: The training device (where the flag and counters live).
        policy: ``train.on_nan``: ``"stop"`` or ``"skip_step"``.
        max_skips: ``train.max_nan_skips``: bad steps in a row that stop a ``skip_step`` run.
        grad_clip: ``train.grad_clip``: max global gradient norm, ``None`` for no clipping.
        check_every: Steps between host reads of the counters.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 *, policy: str = "stop", max_skips: int = 10, grad_clip: float | None = None,
                 check_every: int = CHECK_EVERY) -> None:
        if policy not in ON_NAN:
            raise ValueError(f"train.on_nan must be one of {', '.join(ON_NAN)}, got {policy!r}")
        self.model, self.optimizer, self.device = model, optimizer, torch.device(device)
        self.policy, self.max_skips, self.grad_clip = policy, max_skips, grad_clip
        self.check_every = max(1, check_every)
        # bad steps this epoch, current run of bad steps, first bad step, step the run hit the
        # limit (-1: none); int64 on the device, read by the host only in check().
        self.counters = torch.tensor([0, 0, -1, -1], dtype=torch.long, device=self.device)
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.last_norm: Tensor | None = None  # the last step's gradient norm (device scalar)
        self._saved_model: list[Tensor] = []
        self._saved_state: dict[tuple[int, str], Tensor] = {}

    @property
    def skips(self) -> bool:
        """Whether bad steps are masked (``skip_step``)."""
        return self.policy == "skip_step"

    # ---- the step, in the loop's order -------------------------------------------------------

    def begin_epoch(self) -> None:
        """Zero the per-epoch count (the run of bad steps carries over epochs)."""
        self.counters[_BAD] = 0

    def before_forward(self) -> None:
        """``skip_step``: copy the model's tensors and the optimiser state (on the device)."""
        if not self.skips:
            return
        with torch.no_grad():
            live = self._model_tensors()
            if len(self._saved_model) != len(live):
                self._saved_model = [t.detach().clone() for t in live]
            else:
                torch._foreach_copy_(self._saved_model, live)
            seen = set()
            for key, t in self._state_tensors():
                seen.add(key)
                saved = self._saved_state.get(key)
                if saved is None or saved.shape != t.shape or saved.dtype != t.dtype \
                        or saved.device != t.device:
                    self._saved_state[key] = t.detach().clone()
                else:
                    saved.copy_(t)
            for key in set(self._saved_state) - seen:
                del self._saved_state[key]

    def after_backward(self, loss: Tensor, amp: bool = False) -> Tensor:
        """Clip (``grad_clip``) and flag this step; returns the device flag (True = bad).

        Call after AMP's ``unscale_`` and before the method's ``after_backward`` hook. Under
        ``skip_step`` with several ranks the flag is OR-ed over ranks (a one-element
        all-reduce, no host sync), so every rank skips the same steps.
        """
        norm = grad_norm(self.model.parameters(), self.grad_clip)
        self.last_norm = norm  # a device scalar; read only when progress/TensorBoard show it
        bad = ~torch.isfinite(loss.detach()).all()
        if not amp:  # under AMP, inf gradients are the GradScaler's (see module docstring)
            bad = bad | ~torch.isfinite(norm.to(bad.device))
        if self.skips and world_size() > 1:
            flag = bad.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = flag.bool()
        self._bad = bad
        return bad

    def after_step(self, step: int) -> None:
        """Count the step; ``skip_step``: put back what a bad step changed."""
        bad, c = self._bad, self.counters
        with torch.no_grad():
            if self.skips:
                for saved, t in zip(self._saved_model, self._model_tensors(), strict=True):
                    t.copy_(torch.where(bad, saved, t))
                for key, t in self._state_tensors():
                    saved = self._saved_state.get(key)
                    # State the optimiser made in this step (its first): zeros are the fresh
                    # state of SGD/LARS momentum (m·0 + g = g) and of Adam (moments, step 0).
                    before = saved if saved is not None else torch.zeros_like(t)
                    t.copy_(torch.where(bad.to(t.device), before, t))
            b = bad.long()
            c[_BAD] += b
            c[_STREAK] = (c[_STREAK] + 1) * b
            c[_FIRST_BAD] = torch.where(bad & (c[_FIRST_BAD] < 0), step, c[_FIRST_BAD])
            hit = (c[_STREAK] >= self.max_skips) & (c[_LIMIT] < 0)
            c[_LIMIT] = torch.where(hit, step, c[_LIMIT])

    def masked(self, value: Tensor) -> Tensor:
        """``value`` on a good step, 0 on a bad one (a skipped step's loss is not averaged)."""
        return torch.where(self._bad, torch.zeros_like(value), value)

    @property
    def good(self) -> Tensor:
        """1.0 on a good step, 0.0 on a bad one (device scalar)."""
        return (~self._bad).float()

    # ---- host reads ---------------------------------------------------------------------------

    def due(self, steps_done: int) -> bool:
        """Whether the host reads the counters after ``steps_done`` steps of this epoch."""
        return steps_done % self.check_every == 0

    def check(self, epoch: int) -> int:
        """Read the counters (one host sync); raise if the policy says stop.

        Returns the bad steps of this epoch so far (skipped under ``skip_step``). With several
        ranks the counters are agreed first (max of counts, min of steps), so all ranks stop
        together.
        """
        values = self.counters.clone()
        if world_size() > 1:
            counts, steps = values[:_FIRST_BAD], values[_FIRST_BAD:]
            # -1 means "none": make it the largest step for a min-reduce.
            big = torch.iinfo(torch.long).max
            steps = torch.where(steps < 0, big, steps)
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
            dist.all_reduce(steps, op=dist.ReduceOp.MIN)
            values = torch.cat([counts, torch.where(steps == big, -1, steps)])
        bad, _, first, limit = values.tolist()  # the one host read
        done = f"no checkpoint is written for epoch {epoch + 1}; " + (
            f"the last good checkpoint (epoch {epoch}) is kept" if epoch else
            "no checkpoint was written yet")
        if bad and not self.skips:
            raise NonFiniteError(
                f"non-finite loss or gradients at epoch {epoch + 1}, step {first} "
                f"(train.on_nan=stop); {done}. Lower train.lr, set train.grad_clip, or "
                "set train.on_nan=skip_step")
        if limit >= 0:
            raise NonFiniteError(
                f"{self.max_skips} non-finite steps in a row up to epoch {epoch + 1}, step "
                f"{limit} (train.max_nan_skips={self.max_skips}); {done}. The run is "
                "diverging: lower train.lr or set train.grad_clip")
        return bad

    # ---- what a skipped step restores ----------------------------------------------------------

    def _model_tensors(self) -> list[Tensor]:
        return list(self.model.state_dict(keep_vars=True).values())

    def _state_tensors(self) -> Iterator[tuple[tuple[int, str], Tensor]]:
        for p, state in self.optimizer.state.items():
            for name, value in state.items():
                if isinstance(value, Tensor):
                    yield (id(p), name), value
