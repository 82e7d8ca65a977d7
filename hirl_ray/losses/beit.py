"""BEiT's masked image modelling loss (Bao et al., ICLR 2022, Eq. 1)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def masked_token_loss(logits: Tensor, targets: Tensor, num_masked: Tensor | float | None = None
                      ) -> Tensor:
    """−Σ_{i∈M} log p(z_i | x^M) / |M|: cross-entropy of the predicted visual tokens (BEiT Eq. 1).

    Only masked positions enter: the caller passes the head's logits and the tokenizer's ids
    (of the *unmasked* image) at the masked positions alone, ``logits[mask]``, ``ids[mask]``.

    Args:
        logits: ``(M, K)`` predictions at the ``M`` masked positions.
        targets: ``(M,)`` token ids in ``[0, K)``.
        num_masked: The divisor ``|M|``; default ``M``. Under DDP the method passes the global
            count over the number of ranks, so that the DDP-averaged gradient is that of the
            mean over every rank's masked positions, whatever each rank's share.

    Returns:
        Scalar (float32).
    """
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    return total / (targets.shape[0] if num_masked is None else num_masked)
