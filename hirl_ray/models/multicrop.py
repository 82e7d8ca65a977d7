"""One backbone pass per resolution group of views (DINO's ``MultiCropWrapper`` idea)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def resolution_groups(views: Sequence[Tensor]) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of consecutive views with equal ``H × W``.

    E.g. two 224-px and six 96-px crops give ``[(0, 2), (2, 8)]``; views of one size give one
    group. Only *consecutive* equal sizes are merged, so the output keeps the view order.
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


def forward_by_resolution(backbone: Callable[[Tensor], Tensor], views: Sequence[Tensor]) -> Tensor:
    """Backbone features of every view, one forward per resolution group.

    Consecutive views of equal ``H × W`` are concatenated into one batch (Caron et al. 2021,
    ``utils.MultiCropWrapper``): fewer, larger passes, and BatchNorm sees all views of a size
    together, as SimCLR's joint batch of both views does. Two views of one size are exactly one
    pass over ``torch.cat(views)``.

    Args:
        backbone: Maps ``(N, 3, H, W)`` to ``(N, D)`` for any ``H × W`` it supports.
        views: ``V`` tensors ``(B_i, 3, H_i, W_i)``.

    Returns:
        ``(Σ B_i, D)`` features in view order: rows of view ``i`` follow those of view ``i − 1``.
    """
    if not views:
        raise ValueError("forward_by_resolution needs at least one view")
    outputs = [backbone(torch.cat(list(views[a:b])) if b - a > 1 else views[a])
               for a, b in resolution_groups(views)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
