"""Optimisers from parameter groups: SGD with momentum, AdamW, and LARS.

A method's :meth:`~hirl_ray.methods.base.SSLMethod.param_groups` says which parameters
train how; :func:`build_optimizer` turns the groups plus the ``train:`` section into an
optimiser, and :func:`apply_schedule` sets every group's learning rate and weight decay each
step. Group keys understood here:

* ``weight_decay``: the group's own weight decay, kept for the whole run (e.g. 0 for norms
  and biases); groups without one get ``train.weight_decay`` and follow its schedule;
* ``lr_scale``: multiplies the group's learning rate (default 1);
* ``fixed_lr: True``: the group's learning rate stays at ``train.lr`` (no warm-up, no decay);
* ``lars_exclude: True``: LARS neither adapts nor decays the group (norms, biases).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from hirl_ray.config import TrainConfig

#: SGD momentum of every SGD-style optimiser here (MoCo, SimCLR, BYOL: 0.9).
MOMENTUM = 0.9
#: LARS trust coefficient η (You et al. 2017; SimCLR and BYOL use 1e-3).
LARS_ETA = 1e-3


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling on SGD with momentum (You et al. 2017, Algorithm 1).

    For every parameter ``w`` with gradient ``g`` in a group without ``lars_exclude``:

        trust = η ‖w‖ / (‖g‖ + λ ‖w‖)   (1 when ‖w‖ or ‖g‖ is 0)
        u = trust · (g + λ w)

    and in a group with ``lars_exclude: True`` (norms and biases, as in SimCLR and BYOL)
    ``u = g``: no adaptation and no weight decay. Then, as PyTorch's SGD (dampening 0):

        v ← m v + u   (v = u at the first step),    w ← w − lr · v.

    Args:
        params: Parameters or parameter groups.
        lr: Learning rate (the loop sets it per group every step).
        momentum: m.
        weight_decay: λ.
        eta: Trust coefficient η.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = MOMENTUM,
                 weight_decay: float = 0.0, eta: float = LARS_ETA) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr, momentum, weight_decay >= 0 and eta > 0; got "
                             f"{lr}, {momentum}, {weight_decay}, {eta}")
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                    "lars_exclude": False}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One LARS update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta = group["weight_decay"], group["eta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(update)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        eta * w_norm / (g_norm + wd * w_norm),
                                        torch.ones_like(w_norm))
                    update = update.add(p, alpha=wd).mul_(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update.detach().clone()
                else:
                    buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def _as_groups(groups: Iterable[Any]) -> list[dict[str, Any]]:
    """Groups as fresh dicts (the caller's stay untouched); bare parameters become one group."""
    items = list(groups)
    if items and isinstance(items[0], (Tensor, nn.Parameter)):
        return [{"params": items}]
    out = []
    for g in items:
        g = dict(g)
        g["params"] = list(g["params"])
        # Whether the group follows train.weight_decay (and its schedule) or keeps its own.
        g["scheduled_weight_decay"] = "weight_decay" not in g
        out.append(g)
    return [g for g in out if g["params"]]


def build_optimizer(groups: Iterable[Any], train: TrainConfig,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``groups``: SGD (momentum 0.9), AdamW or LARS.

    Args:
        groups: Parameter groups (``HirlModel.param_groups()``), or plain parameters.
        train: The ``train:`` section: ``optimizer``, ``lr`` and ``weight_decay`` (the default
            of groups without their own).
        capturable: AdamW keeps its step counter on the parameters' device (CUDA only), so
            ``train.on_nan=skip_step`` can undo a step without a host sync; same updates.

    Returns:
        The optimiser; its groups keep their extra keys (``lr_scale``, ``fixed_lr``, …) for
        :func:`apply_schedule`.
    """
    groups = _as_groups(groups)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay,
                                 capturable=capturable)
    if train.optimizer == "lars":
        return LARS(groups, lr=train.lr, momentum=MOMENTUM, weight_decay=train.weight_decay)
    return torch.optim.SGD(groups, lr=train.lr, momentum=MOMENTUM,
                           weight_decay=train.weight_decay)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, base_lr: float,
                   weight_decay: float | None = None) -> None:
    """Set every group's learning rate (and weight decay) for the next step.

    Args:
        optimizer: Built by :func:`build_optimizer`.
        lr: The scheduled learning rate (``schedules.cosine_lr``).
        base_lr: ``train.lr``, for ``fixed_lr`` groups.
        weight_decay: The scheduled weight decay for groups without their own; ``None``
            leaves every group's weight decay as it is.
    """
    for group in optimizer.param_groups:
        group["lr"] = (base_lr if group.get("fixed_lr") else lr) * group.get("lr_scale", 1.0)
        if weight_decay is not None and group.get("scheduled_weight_decay", True):
            group["weight_decay"] = weight_decay
