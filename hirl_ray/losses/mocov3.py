"""MoCo v3's contrastive loss (Chen, Xie & He, ICCV 2021, Algorithm 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def mocov3_contrastive_loss(q: Tensor, k: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """InfoNCE of queries against the keys of the whole (global) batch, scaled by 2τ.

    MoCo v3 Algorithm 1, ``ctr(q, k)``: ``logits = q·kᵀ/τ``, the positive of query ``i`` is key
    ``offset + i`` and every other key is a negative; ``CrossEntropyLoss(logits, labels) · 2τ``
    (the 2τ makes the gradient scale independent of τ, as the official ``ctr``). The method
    symmetrises it: ``ctr(q1, k2) + ctr(q2, k1)``.

    Args:
        q: ``(B, D)`` queries (predictor outputs of this worker's views; normalised here).
        k: ``(N, D)`` keys of every worker's batch in rank order (momentum-encoder outputs,
            no grad; normalised here), ``N = W·B``.
        temperature: τ > 0 (MoCo v3: 0.2 for ViTs, 1.0 for ResNets).
        offset: Row of ``k`` holding the positive of ``q[0]``: ``rank · B`` under DDP.

    Returns:
        Scalar loss, the mean over the ``B`` queries (float32).
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2.0 * temperature)
