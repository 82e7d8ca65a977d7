"""Collectives the SSL methods need under DDP, with gradients that match one big batch.

Plain ``torch.distributed`` (no Ray); every function is the identity when the default process
group is not initialised or has one rank, so the methods run unchanged in a single process.

Gradient convention. DDP averages parameter gradients over the ``W`` ranks, and every rank's
loss is the mean over its *local* anchors, so the DDP gradient is that of the mean over all
``W·B`` anchors (the 1-worker loss of the global batch) exactly when the backward of a
gathered/reduced tensor is the **sum** over ranks of the gradients every rank's loss sent to
it. :func:`gather` therefore all-reduces (sums) its gradient and keeps this rank's slice; an
average there, or keeping only the local gradient, is off by ``W`` (lightly #1528, #1920,
#1977). ``tests/test_distributed.py`` checks 1×2B against 2×B.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _Gather(torch.autograd.Function):
    """All-gather along dim 0; backward = all-reduce(sum) of the gradient, this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every rank's loss used every row of the gathered tensor: sum their gradients so each
        # rank holds d(Σ_r loss_r)/d(its rows); DDP's 1/W average then gives d(mean loss).
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


class _AllReduceSum(torch.autograd.Function):
    """All-reduce(sum); backward = all-reduce(sum) (every rank's output is the same sum)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather(x: Tensor) -> Tensor:
    """``(B, …)`` per rank → ``(W·B, …)`` in rank order, differentiable (see module docstring).

    Every rank must pass the same ``B`` (the training loader drops ragged batches).
    """
    return _Gather.apply(x) if world_size() > 1 else x


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather without gradient (MoCo's ``concat_all_gather``, for keys)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Differentiable sum over ranks (identity with one rank)."""
    return _AllReduceSum.apply(x) if world_size() > 1 else x


@torch.no_grad()
def shuffle_across_ranks(x: Tensor) -> tuple[Tensor, Tensor]:
    """MoCo's batch shuffle (He et al. 2020, Sec. 3.3 "Shuffling BN").

    Gathers ``x`` from all ranks, permutes the global batch with a permutation drawn on rank 0
    and broadcast, and returns this rank's ``B`` rows of it plus the inverse permutation for
    :func:`unshuffle_across_ranks`. A key then gets its BN statistics from samples other than
    its query's, so BN cannot leak which key is the positive.
    """
    full = gather_no_grad(x)
    perm = torch.randperm(full.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    n, r = x.shape[0], rank()
    return full[perm[r * n:(r + 1) * n]], torch.argsort(perm)


@torch.no_grad()
def unshuffle_across_ranks(y: Tensor, inverse: Tensor) -> Tensor:
    """All ``W·B`` outputs of :func:`shuffle_across_ranks`' rows, back in rank order."""
    return gather_no_grad(y)[inverse]


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over every rank's batch, for CPU tensors (gloo).

    PyTorch's ``nn.SyncBatchNorm`` raises on CPU input in training (torch 2.14: "expected
    input tensor to be on GPU or XPU"), and DDP refuses CPU modules that contain it, so CPU
    clusters and the tests need their own. In training with more than one rank this computes
    the global mean and biased variance from all-reduced per-channel sums (float64, so
    E[x²]−E[x]² does not cancel) through a differentiable all-reduce, which gives the outputs
    and gradients of one BatchNorm over the global batch; otherwise it is plain BatchNorm.
    Same parameters and buffers as ``BatchNorm*d``, so checkpoints load either way.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        """Batch norm with statistics over every rank's batch."""
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        local = torch.stack([x.sum(dims, dtype=torch.float64),
                             (x * x).sum(dims, dtype=torch.float64)])
        total = all_reduce_sum(local)
        n = x.numel() // x.shape[1] * world_size()  # equal batches on every rank
        mean = total[0] / n
        var = (total[1] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                # The running variance is the unbiased one, as in F.batch_norm.
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(
                    (var * n / max(n - 1, 1)).to(self.running_var.dtype), alpha=m)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var + self.eps).to(x.dtype).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device_type: str = "cpu") -> nn.Module:
    """Every ``BatchNorm*d`` in ``module`` synchronised across ranks (call before DDP).

    ``device_type`` "cpu": :class:`CPUSyncBatchNorm`, in place (``BatchNorm1d/2d/3d`` differ
    from their base only in the input-dim check, so swapping the class keeps parameters,
    buffers, hooks and mode); otherwise PyTorch's ``nn.SyncBatchNorm``.
    """
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            m.__class__ = CPUSyncBatchNorm
    return module


def has_sync_bn(module: nn.Module) -> bool:
    """Whether any BN layer of ``module`` synchronises across ranks."""
    return any(isinstance(m, (nn.SyncBatchNorm, CPUSyncBatchNorm)) for m in module.modules())


def ddp_kwargs() -> dict[str, Any]:
    """DDP arguments for the SSL methods: no buffer broadcast at every forward.

    DDP's default copies rank 0's buffers to every rank before each forward, which would
    overwrite each rank's MoCo queue with rank 0's. The queue is the same on every rank anyway
    (keys are gathered before enqueueing), and BN running stats only matter for evaluation,
    where rank 0's are the ones checkpointed. ``forward_sync_buffers=False`` (torch ≥ 2.13)
    still syncs buffers once at construction, which makes the initial random queue agree;
    the older ``broadcast_buffers=False`` does not, so then call :func:`broadcast_buffers`.
    """
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers to every rank (once, before training; no-op with one rank)."""
    if world_size() == 1:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0)
