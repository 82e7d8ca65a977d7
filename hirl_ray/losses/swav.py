"""SwAV (Caron et al., NeurIPS 2020): Sinkhorn-Knopp codes and the swapped-prediction loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _identity(x: Tensor) -> Tensor:
    return x


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iters: int = 3,
             all_reduce: Callable[[Tensor], Tensor] = _identity) -> Tensor:
    """Soft codes of a batch by the Sinkhorn-Knopp algorithm (SwAV Sec. 3.1, Eq. 3; Alg. 1).

    The codes solve the entropic transport problem ``max_Q Tr(Qᵀ Cᵀ Z) + ε H(Q)`` over the
    transportation polytope whose ``B`` samples each carry mass ``1/B`` and whose ``K``
    prototypes each receive ``1/K``: ``Q = Diag(u) exp(Cᵀ Z / ε) Diag(v)`` after ``iters``
    alternations of prototype and sample normalisation, as the official
    ``distributed_sinkhorn`` (SwAV and HIRL code) does. ``B`` is the GLOBAL batch: every sum
    over samples goes through ``all_reduce``, so with the ranks' rows split across processes
    and ``all_reduce`` their sum, each rank gets its rows of the one-process result on the
    concatenated rows (sums over prototypes are local to a row).

    Convention of the result (SwAV's ``Q *= B``): row ``i`` is sample ``i``'s code, a
    probability vector over the prototypes (each row sums to 1, exactly: the last
    normalisation is per sample); over the global batch, column ``k`` sums to ``B/K``
    (1/K of the total ``B``) in the limit of many iterations, approximately after the
    paper's 3.

    Args:
        scores: ``(N, K)`` this rank's prototype scores ``zᵀc`` (cosines: ``exp(·/ε)`` stays
            finite in float32 for |score| ≤ 1 and ε ≥ 0.02). Computed in float32.
        epsilon: Entropy weight ε (paper: 0.05).
        iters: Sinkhorn iterations (paper: 3).
        all_reduce: Sum of a tensor over ranks, returned (identity: one rank). The method
            passes its differentiable/collective sum; nothing here knows about processes.

    Returns:
        ``(N, K)`` float32 codes of this rank's rows, no gradient.
    """
    q = torch.exp(scores.detach().float() / epsilon).t()  # (K, N)
    k = q.shape[0]
    # Global batch size; filled on the device (torch.tensor(x, device=) would copy from the host
    # and make it wait).
    b = all_reduce(torch.full((), float(q.shape[1]), device=q.device))
    q /= all_reduce(q.sum())
    for _ in range(iters):
        q /= all_reduce(q.sum(dim=1, keepdim=True))  # each prototype's total mass -> 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample's mass -> 1/B
        q /= b
    return (q * b).t()


def swav_loss(scores: Sequence[Tensor], codes: Sequence[Tensor], temperature: float) -> Tensor:
    """Swapped prediction (SwAV Eq. 1–2, multi-crop Eq. 5 / Sec. 3.2).

    The code of crop ``i`` (one of the first ``len(codes)`` crops, the global ones) is
    predicted from every other crop ``v``:
    ``ℓ(z_v, q_i) = −Σ_k q_i^(k) log p_v^(k)``, ``p_v = softmax(z_vᵀC / τ)``;
    ``L = 1/|codes| Σ_i 1/(V−1) Σ_{v≠i} mean_batch ℓ(z_v, q_i)``, the official SwAV
    ``main_swav.py`` average (HIRL's ``get_loss`` is the same for equal crop batches).

    Args:
        scores: ``V`` tensors ``(B, K)``: prototype scores ``zᵀC`` of each crop (with grad).
        codes: ``(B, K)`` codes of crops ``0 … len(codes)−1`` (:func:`sinkhorn`; no grad).
        temperature: τ (paper: 0.1).

    Returns:
        Scalar float32 loss.
    """
    if not 1 <= len(codes) <= len(scores) or len(scores) < 2:
        raise ValueError(f"swav_loss needs >= 2 crops and 1..V codes, got {len(scores)} "
                         f"crops and {len(codes)} codes")
    log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    total = scores[0].new_zeros((), dtype=torch.float32)
    for i, q in enumerate(codes):
        others = [lp for v, lp in enumerate(log_p) if v != i]
        total = total + sum(-(q * lp).sum(dim=1).mean() for lp in others) / len(others)
    return total / len(codes)
