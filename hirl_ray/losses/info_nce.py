"""InfoNCE against a queue of negative keys (MoCo, He et al., CVPR 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE with a queue of negatives (MoCo Eq. 1).

    L_q = −log exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_{k⁻ ∈ queue} exp(q·k⁻/τ)).

    Args:
        q: ``(B, D)`` L2-normalised queries.
        k: ``(B, D)`` L2-normalised positive keys (no grad).
        queue: ``(K, D)`` L2-normalised negative keys.
        temperature: τ > 0.

    Returns:
        Scalar loss averaged over the batch (float32).
    """
    q = q.float()
    pos = (q * k.float()).sum(dim=1, keepdim=True)
    neg = q @ queue.float().T
    logits = torch.cat([pos, neg], dim=1) / temperature
    # The positive is always column 0.
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)
