"""Training schedules as plain functions of progress (DINO's ``cosine_scheduler`` idea).

Every schedule maps ``progress`` ∈ [0, 1] (the fraction of training done; values outside are
clipped) to a number, so the loop and the methods read one value per step and nothing keeps
state: a resumed run continues each schedule exactly where it stopped. This module is a leaf
(it imports nothing of ``hirl_ray``).

* learning rate: linear warm-up, then cosine decay (:func:`cosine_schedule`, :func:`cosine_lr`);
* weight decay: cosine from ``train.weight_decay`` to ``train.weight_decay_end``;
* EMA momentum of a target network: cosine from τ_base to 1 (:func:`cosine_momentum`);
* teacher temperature: linear warm-up, then constant (:func:`teacher_temperature`).
"""

from __future__ import annotations

import math


def _clip(progress: float) -> float:
    return min(max(progress, 0.0), 1.0)


def linear_warmup(base: float, done: float, length: float, start: float = 0.0) -> float:
    """``start + (base − start) · done / length``: the straight line from ``start`` to ``base``.

    ``done`` and ``length`` may be in any unit (steps, epochs, fractions of training).
    Goyal et al. 2017 ("gradual warm-up", Sec. 2.2), as used by SimCLR and DINO.
    """
    return start + (base - start) * done / length


def cosine_decay(base: float, final: float, t: float) -> float:
    """``final + (base − final) · (1 + cos(π·t)) / 2`` for ``t`` ∈ [0, 1] (clipped above at 1).

    SGDR without restarts (Loshchilov & Hutter 2017, Eq. 5): ``base`` at ``t = 0``, ``final``
    at ``t = 1``.
    """
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def cosine_schedule(base: float, final: float, progress: float, warmup_progress: float = 0.0,
                    start: float = 0.0) -> float:
    """Linear warm-up from ``start`` to ``base``, then cosine decay from ``base`` to ``final``.

    The schedule of DINO's ``utils.cosine_scheduler`` (Caron et al. 2021, Sec. 4 / App. B:
    learning rate and weight decay) as a function of progress.

    Args:
        base: Value at the end of warm-up (the peak of a learning-rate schedule).
        final: Value at ``progress = 1``.
        progress: Fraction of training done, clipped to [0, 1].
        warmup_progress: Fraction of training spent warming up (0: none).
        start: Value at ``progress = 0`` when warming up.

    Returns:
        The scheduled value.
    """
    progress = _clip(progress)
    if warmup_progress > 0 and progress < warmup_progress:
        return linear_warmup(base, progress, warmup_progress, start)
    if warmup_progress >= 1:
        return base
    return cosine_decay(base, final, (progress - warmup_progress) / (1.0 - warmup_progress))


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0,
              min_lr: float = 0.0) -> float:
    """The learning rate at ``step``: linear warm-up then cosine decay to ``min_lr``.

    Warm-up reaches ``base_lr`` at its last step (step ``warmup_steps − 1`` has
    ``base_lr``), then :func:`cosine_decay` runs over the remaining steps (Chen et al. 2020,
    App. B.1: linear warm-up for 10 epochs, cosine decay without restarts; DINO and the paper's
    ViT recipes decay to ``min_lr`` = 2e-6 / 1e-5 instead of 0).
    """
    if warmup_steps and step < warmup_steps:
        return linear_warmup(base_lr, step + 1, warmup_steps)
    return cosine_decay(base_lr, min_lr,
                        (step - warmup_steps) / max(1, total_steps - warmup_steps))


def weight_decay_schedule(base: float, final: float | None, progress: float) -> float:
    """Weight decay: constant ``base`` when ``final`` is ``None``, else cosine ``base → final``.

    DINO raises the weight decay of ViTs from 0.04 to 0.4 with a cosine (Caron et al. 2021,
    App. B "weight decay follows a cosine schedule from 0.04 to 0.4").
    """
    return base if final is None else cosine_schedule(base, final, progress)


def cosine_momentum(base: float, progress: float) -> float:
    """EMA decay τ = 1 − (1 − τ_base)·(cos(π·progress) + 1)/2, from τ_base up to 1.

    BYOL's target update (Grill et al. 2020, Sec. 3.2), also DINO's teacher momentum
    (Caron et al. 2021, Sec. 3.1: 0.996 → 1).
    """
    return 1.0 - (1.0 - base) * (math.cos(math.pi * _clip(progress)) + 1.0) / 2.0


def teacher_temperature(base: float, progress: float, warmup_start: float | None = None,
                        warmup_progress: float = 0.0) -> float:
    """Teacher softmax temperature: linear from ``warmup_start`` to ``base``, then constant.

    DINO warms the teacher temperature up from 0.04 to 0.07 over the first 30 epochs
    (Caron et al. 2021, Sec. 4 / App. D: "a linear warm-up for the teacher temperature").

    Args:
        base: Temperature after warm-up.
        progress: Fraction of training done.
        warmup_start: Temperature at ``progress = 0`` (``None``: no warm-up).
        warmup_progress: Fraction of training the warm-up lasts.
    """
    progress = _clip(progress)
    if warmup_start is None or warmup_progress <= 0 or progress >= warmup_progress:
        return base
    return linear_warmup(base, progress, warmup_progress, warmup_start)
