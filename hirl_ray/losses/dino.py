"""DINO self-distillation loss and centre update (Caron et al., ICCV 2021, Sec. 3.1, Alg. 1)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def dino_loss(student: Tensor, teacher: Tensor, center: Tensor, student_temp: float,
              teacher_temp: float) -> Tensor:
    """Cross-entropy between the centred, sharpened teacher and the student, over crop pairs.

    DINO Eq. 1–2 / Alg. 1: ``P_t = softmax((g_t − c) / τ_t)``, ``log P_s = log_softmax(g_s / τ_s)``
    and ``H(P_t, P_s) = −Σ_k P_t log P_s``, averaged over the batch, then over every pair of a
    teacher global crop ``i`` and a student view ``v ≠ i`` (the global crops are the first
    views, so ``v = i`` is the same crop). ``min Σ_{x∈{x1g,x2g}} Σ_{x'∈V, x'≠x} H(P_t(x), P_s(x'))``
    with the sum normalised by the number of pairs, as the official code does.

    Args:
        student: ``(V, B, K)`` student logits of ``V`` views (global crops first).
        teacher: ``(G, B, K)`` teacher logits of the ``G`` global crops (no gradient flows to
            them: the teacher is stop-gradient).
        center: ``(K,)`` or ``(1, K)`` centre ``c`` subtracted from the teacher logits.
        student_temp: τ_s (0.1).
        teacher_temp: τ_t (0.04 → 0.07 during warm-up).

    Returns:
        Scalar loss.
    """
    if student.shape[1:] != teacher.shape[1:] or teacher.shape[0] > student.shape[0]:
        raise ValueError(f"dino_loss: student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)} must be (V, B, K) and (G <= V, B, K)")
    log_p = F.log_softmax(student / student_temp, dim=-1)
    p_t = F.softmax((teacher - center.reshape(-1)) / teacher_temp, dim=-1).detach()
    total, terms = student.new_zeros(()), 0
    for i in range(teacher.shape[0]):
        for v in range(student.shape[0]):
            if v == i:
                continue
            total = total + (-(p_t[i] * log_p[v]).sum(-1)).mean()
            terms += 1
    if terms == 0:
        raise ValueError("dino_loss needs a student view other than the teacher's one crop")
    return total / terms


def update_center(center: Tensor, teacher_sum: Tensor, count: int, momentum: float) -> Tensor:
    """The new centre ``c ← m·c + (1 − m)·(Σ g_t) / count`` (DINO Eq. 4).

    A pure function of the batch *sum*: under data parallelism the method all-reduces
    ``teacher_sum`` over the ranks first and passes the global ``count``, so the centre is
    the mean over the global batch on every rank (the official ``update_center``).

    Args:
        center: Current centre, any shape broadcastable with ``teacher_sum``.
        teacher_sum: Sum of the teacher logits over the (global) batch and global crops.
        count: Number of logit rows summed (``G · B_global``).
        momentum: ``m`` (0.9).
    """
    return center * momentum + teacher_sum / count * (1.0 - momentum)
