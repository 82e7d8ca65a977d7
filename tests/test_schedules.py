"""Schedules as plain functions of progress (``hirl_ray.schedules``)."""

from __future__ import annotations

import math

import pytest

from hirl_ray.schedules import (
    cosine_lr,
    cosine_momentum,
    cosine_schedule,
    teacher_temperature,
    weight_decay_schedule,
)


def _cosine_lr_before_the_move(base_lr, step, total_steps, warmup_steps=0):
    """``train/loop.py::cosine_lr`` as it was, to check the schedules module changed nothing."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def test_cosine_lr_is_bit_identical_to_the_old_loop_schedule():
    for base in (0.05, 0.3, 1.7):
        for total, warmup in ((100, 0), (100, 10), (37, 5), (1, 0)):
            for step in range(total + 3):
                assert cosine_lr(base, step, total, warmup) == \
                    _cosine_lr_before_the_move(base, step, total, warmup)


def test_cosine_lr_warmup_then_decay_to_zero():
    assert cosine_lr(1.0, 0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr(1.0, 9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(1.0, 100, 100) == pytest.approx(0.0, abs=1e-12)
    values = [cosine_lr(1.0, s, 100) for s in range(100)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_cosine_schedule_warms_up_linearly_then_decays_to_final():
    assert cosine_schedule(1.0, 0.1, 0.0, warmup_progress=0.2, start=0.5) == pytest.approx(0.5)
    assert cosine_schedule(1.0, 0.1, 0.1, warmup_progress=0.2, start=0.5) == pytest.approx(0.75)
    assert cosine_schedule(1.0, 0.1, 0.2, warmup_progress=0.2) == pytest.approx(1.0)
    assert cosine_schedule(1.0, 0.1, 0.6, warmup_progress=0.2) == pytest.approx(0.55)  # midway
    assert cosine_schedule(1.0, 0.1, 1.0, warmup_progress=0.2) == pytest.approx(0.1)
    assert cosine_schedule(1.0, 0.1, 7.0) == pytest.approx(0.1)  # progress is clipped
    assert cosine_schedule(1.0, 0.1, 0.5, warmup_progress=1.0, start=0.0) == pytest.approx(0.5)


def test_weight_decay_is_constant_without_an_end_value_else_cosine():
    assert {weight_decay_schedule(1e-4, None, p) for p in (0.0, 0.3, 1.0)} == {1e-4}
    assert weight_decay_schedule(0.04, 0.4, 0.0) == pytest.approx(0.04)
    assert weight_decay_schedule(0.04, 0.4, 0.5) == pytest.approx(0.22)
    assert weight_decay_schedule(0.04, 0.4, 1.0) == pytest.approx(0.4)


def test_byol_momentum_schedule_goes_from_base_to_one():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.99, -1.0) == pytest.approx(0.99)


def test_teacher_temperature_warms_up_linearly_then_stays():
    assert teacher_temperature(0.07, 0.0, warmup_start=0.04, warmup_progress=0.3) == \
        pytest.approx(0.04)
    assert teacher_temperature(0.07, 0.15, warmup_start=0.04, warmup_progress=0.3) == \
        pytest.approx(0.055)
    assert teacher_temperature(0.07, 0.3, warmup_start=0.04, warmup_progress=0.3) == 0.07
    assert teacher_temperature(0.07, 0.9, warmup_start=0.04, warmup_progress=0.3) == 0.07
    assert teacher_temperature(0.07, 0.0) == 0.07  # no warm-up


def test_cosine_lr_ends_at_min_lr() -> None:
    from hirl_ray.schedules import cosine_lr

    assert cosine_lr(1.0, 100, 100, 10, min_lr=0.01) == pytest.approx(0.01)
    assert cosine_lr(1.0, 10, 100, 10, min_lr=0.01) == pytest.approx(1.0)
    mid = cosine_lr(1.0, 55, 100, 10, min_lr=0.2)
    assert mid == pytest.approx(0.2 + 0.8 * 0.5)
