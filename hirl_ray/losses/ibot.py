"""iBOT masked patch self-distillation (Zhou et al., ICLR 2022, Sec. 3.2, Eq. 2–3)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def ibot_patch_loss(student: Tensor, teacher: Tensor, masks: Tensor, center: Tensor,
                    student_temp: float, teacher_temp: float) -> Tensor:
    """Masked image modelling loss ``L_MIM`` of iBOT: the student's output on each *masked*
    patch of a global crop predicts the teacher's output on the same patch of the unmasked crop.

    iBOT Eq. 2: ``L_MIM = −Σ_i m_i · P_t^patch(u_i)ᵀ log P_s^patch(û_i)``, with the teacher
    centred (its own centre ``c'``) and sharpened as in DINO. As in the official code, each
    image's sum is divided by its number of masked patches (at least 1: an unmasked image adds
    0), averaged over the batch, then over the ``G`` global crops (student crop ``i`` against
    teacher crop ``i``: the same crop, masked vs unmasked).

    Args:
        student: ``(G, B, N, K)`` student patch logits of the masked global crops.
        teacher: ``(G, B, N, K)`` teacher patch logits of the unmasked global crops.
        masks: ``(G, B, N)`` bool, ``True`` on the masked patches.
        center: ``(K,)`` (or broadcastable) patch centre ``c'``.
        student_temp: τ_s.
        teacher_temp: τ'_t (patch temperature, warmed up like DINO's).

    Returns:
        Scalar loss.
    """
    if student.shape != teacher.shape or masks.shape != student.shape[:3]:
        raise ValueError(f"ibot_patch_loss: student {tuple(student.shape)}, teacher "
                         f"{tuple(teacher.shape)} must be (G, B, N, K) and masks (G, B, N), got "
                         f"{tuple(masks.shape)}")
    log_p = F.log_softmax(student / student_temp, dim=-1)
    p_t = F.softmax((teacher - center.reshape(-1)) / teacher_temp, dim=-1).detach()
    ce = -(p_t * log_p).sum(-1)  # (G, B, N)
    m = masks.to(ce.dtype)
    per_image = (ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # (G, B)
    return per_image.mean(1).mean(0)
