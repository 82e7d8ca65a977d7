"""Regression losses without negatives: SimSiam's negative cosine and BYOL's normalised MSE.

Both stop the gradient on the target branch ``z`` (a projection of the other view; BYOL: of
the target network), which is what keeps these methods from collapsing (SimSiam Sec. 4.1).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def negative_cosine_loss(p: Tensor, z: Tensor) -> Tensor:
    """D(p, z) = −cos(p, stopgrad(z)), averaged over the batch (SimSiam Eq. 1 and 3).

    Args:
        p: ``(B, D)`` predictions (gradient flows).
        z: ``(B, D)`` targets (detached here).

    Returns:
        Scalar in [−1, 1] (float32).
    """
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """‖p̄ − z̄‖² = 2 − 2·cos(p, z), averaged over the batch (BYOL Eq. 2).

    Args:
        p: ``(B, D)`` online predictions (gradient flows).
        z: ``(B, D)`` target projections (detached here).

    Returns:
        Scalar in [0, 4] (float32).
    """
    return (2.0 - 2.0 * F.cosine_similarity(p.float(), z.detach().float(), dim=1)).mean()
