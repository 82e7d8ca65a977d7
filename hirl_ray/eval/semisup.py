"""Semi-supervised evaluation: fine-tune on 1% / 10% class-balanced label subsets (``semisup``).

The protocol of SimCLR (Chen et al. 2020, Sec. 6 "Semi-supervised learning"), BYOL and HIRL
(Xu et al. 2022, Sec. 5.2, Table 3): the pretrained backbone plus a linear head is fine-tuned
on a small labelled fraction of the train split and scored on the whole test split. The
ImageNet papers use fixed, published 1% / 10% image lists so that every method sees the same
labels; :func:`balanced_subset` plays that role for any dataset: the subset is a function of
the labels, the fraction and ``subset_seed`` only (not of the training seed, the model or any
global RNG), so runs and methods compared on one dataset train on the same images. Subsets
are class-balanced (the same number of samples per class, at least one) and nested (the 1%
subset lies inside the 10% one). Training is :func:`~hirl_ray.eval.finetune.train_classifier`,
the trainer of the ``finetune`` protocol.

Pure PyTorch / numpy; nothing here imports ``ray``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from hirl_ray.config import ConfigError
from hirl_ray.eval.finetune import (
    FinetuneConfig,
    finetune_scores,
    level_task,
    require_backbone,
)
from hirl_ray.eval.protocol import EvalInputs, EvalProtocol, register_protocol


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A class-balanced, seeded subset of the labelled rows of ``labels``.

    Every class present gets ``m = max(1, round(fraction * n / C))`` samples (``n`` labelled
    rows, ``C`` classes), or all of its samples if it has fewer. Each class's rows are put in a
    random order drawn from ``seed`` alone and the first ``m`` are taken, so the result is
    deterministic, independent of any global RNG, and nested: a smaller fraction's subset is
    contained in a larger one's (same ``labels`` and ``seed``).

    Args:
        labels: ``(N,)`` class per row; ``< 0`` = unlabelled (never picked).
        fraction: Share of the labelled rows to keep, in ``(0, 1]``.
        seed: Seed of the per-class orders.

    Returns:
        Sorted int64 row indices into ``labels``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"balanced_subset: fraction must be in (0, 1], got {fraction}")
    y = np.asarray(labels).reshape(-1)
    classes = np.unique(y[y >= 0])
    if classes.size == 0:
        return np.empty(0, dtype=np.int64)
    per_class = max(1, math.floor(fraction * int((y >= 0).sum()) / classes.size + 0.5))
    rng = np.random.default_rng(seed)
    # One permutation per class, drawn in class order whatever the fraction: nested subsets.
    picks = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def fraction_tag(fraction: float) -> str:
    """The fraction as it appears in metric keys: ``0.01 -> "1pct"``, ``0.005 -> "0.5pct"``."""
    return f"{round(100 * fraction, 6):g}pct"


@dataclass(frozen=True)
class SemisupConfig(FinetuneConfig):
    """``eval.params.semisup``: the fine-tuning settings (see
    :class:`~hirl_ray.eval.finetune.FinetuneConfig`; more epochs and smaller batches by default,
    as the subsets are small) plus the label fractions and the subset seed.

    Attributes:
        fractions: Shares of the labelled train split, each in ``(0, 1)``; one run each.
        subset_seed: Seed of the label subsets; fixed by default so that every run and method
            is scored on the same subset (it is not the training seed).
    """

    epochs: int = 60
    batch_size: int = 64
    fractions: tuple[float, ...] = (0.01, 0.1)
    subset_seed: int = 0

    def check(self, where: str) -> None:
        super().check(where)
        if not self.fractions:
            raise ConfigError(f"{where}.fractions must list at least one fraction, e.g. "
                              "[0.01, 0.1]")
        for f in self.fractions:
            if not 0.0 < f < 1.0:
                raise ConfigError(f"{where}.fractions must each be in (0, 1), got {f}; "
                                  "use the finetune protocol for all labels")
        tags = [fraction_tag(f) for f in self.fractions]
        if len(set(tags)) != len(tags):
            raise ConfigError(f"{where}.fractions lists a fraction twice: {list(self.fractions)}")


@register_protocol
class SemisupProtocol(EvalProtocol):
    """``semisup_<p>pct_top1/<level>`` (and ``_top5``) for each fraction ``p``% of the labels.

    Declared prefixes cover the default fractions (1% and 10%); other fractions give keys of
    the same form (``semisup_5pct_top1/<level>``) that are reported but not declared.
    """

    name = "semisup"
    Config = SemisupConfig
    needs_backbone: ClassVar[bool] = True  # see FinetuneProtocol
    metric_prefixes = ("semisup_1pct_top1", "semisup_1pct_top5",
                       "semisup_10pct_top1", "semisup_10pct_top5")

    def run(self, inputs: EvalInputs) -> dict[str, float]:
        require_backbone(inputs, self.name)
        cfg = self.config
        task = level_task(inputs, cfg.level, f"eval.params.{self.name}")
        if task is None:
            return {}
        metrics: dict[str, float] = {}
        for fraction in cfg.fractions:
            rows = balanced_subset(task.train_y, fraction, cfg.subset_seed)
            metrics.update(finetune_scores(inputs, task, rows, cfg,
                                           f"semisup_{fraction_tag(fraction)}"))
        return metrics
