"""NT-Xent, the normalised temperature-scaled cross entropy of SimCLR (Chen et al., ICML 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float, all_z1: Tensor | None = None,
                 all_z2: Tensor | None = None, offset: int = 0) -> Tensor:
    """Normalised temperature-scaled cross entropy (SimCLR Eq. 1), averaged over the anchors.

    ℓ(i, j) = −log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ), where j is the other
    view of i, sim is the cosine similarity and the 2N−2 other samples of the (global) batch
    are the negatives.

    Args:
        z1: ``(B, D)`` projections of view 1, the anchors (need not be normalised).
        z2: ``(B, D)`` projections of view 2.
        temperature: τ > 0.
        all_z1: ``(N, D)`` view-1 projections of the whole batch over all ranks (rows
            ``offset:offset+B`` are ``z1``); ``None``: ``z1`` itself (N = B).
        all_z2: Same for view 2.
        offset: Row of ``z1[0]`` in ``all_z1``.

    Returns:
        Scalar loss, the mean over the ``2B`` anchors ``z1``, ``z2`` (float32).
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    if all_z1 is None or all_z2 is None:
        all_z1, all_z2 = z1, z2
    n = all_z1.shape[0]
    c = F.normalize(torch.cat([all_z1, all_z2]).float(), dim=1)
    logits = z @ c.T / temperature
    rows = torch.arange(2 * b, device=z.device)
    own = torch.cat([offset + rows[:b], n + offset + rows[:b]])  # anchor i's column in c
    # Exclude self-similarity from the denominator (k ≠ i); a comparison mask, not an indexed
    # write (which made the host wait on a GPU).
    self_sim = own[:, None] == torch.arange(2 * n, device=z.device)[None, :]
    logits = logits.masked_fill(self_sim, float("-inf"))
    targets = torch.cat([own[b:], own[:b]])  # the other view of the same image
    return F.cross_entropy(logits, targets)
