"""Training pieces the step-level benchmarks share: config, model, batches, timed steps.

Everything goes through the project's own code (``load_config``, ``HirlModel``,
``train_epoch``), so a benchmark measures what ``hirl_ray.fit`` runs, minus Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from experiments.bench.common import ThreadClock
from hirl_ray.config import ExperimentConfig, load_config
from hirl_ray.data import ViewDataset, build_dataset, multi_view_transform
from hirl_ray.hierarchy import PrototypeHierarchy, fit_hierarchy
from hirl_ray.methods.hirl import HirlModel
from hirl_ray.train.loop import HierarchySource, StaticHierarchy, train_epoch
from hirl_ray.train.optim import build_optimizer

#: The default experiment's per-worker view of a step: global batch 128 over 2 workers.
STEP_BATCH = 64


def bench_config(overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The embedded default experiment (``experiments/default.yaml``) plus ``overrides``."""
    return load_config(None, {"train.num_workers": 1, **(overrides or {})})


def build_model(cfg: ExperimentConfig, seed: int = 0) -> tuple[HirlModel, torch.optim.Optimizer]:
    """``HirlModel`` (heads only when ``hirl.enabled``) and its optimiser, seeded."""
    torch.manual_seed(seed)
    model = HirlModel.from_config(cfg)
    opt = build_optimizer(model.param_groups(), cfg.train)
    return model, opt


def train_loader(cfg: ExperimentConfig, batch: int, seed: int = 0) -> DataLoader:
    """Shuffled, augmenting loader over the configured training set (``(views, index)``)."""
    views = ViewDataset(build_dataset(cfg.data, "train"), multi_view_transform(cfg.data.image_size))
    return DataLoader(
        views,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def fixed_batches(
    cfg: ExperimentConfig, batch: int, count: int, seed: int = 0
) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """``count`` augmented batches made once, so step timings exclude data loading."""
    out = []
    for views, index in train_loader(cfg, batch, seed):
        out.append((views, index))
        if len(out) == count:
            break
    return out


def feature_hierarchy(
    num_samples: int, dim: int, num_clusters: Sequence[int], seed: int = 0
) -> PrototypeHierarchy:
    """A real k-means tree (``fit_hierarchy``) over random features of ``num_samples`` rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_samples, dim)).astype(np.float32)
    return fit_hierarchy(x, num_clusters, seed=seed, niter=5, nredo=1, use_gpu=False)


def run_steps(
    model: HirlModel,
    opt: torch.optim.Optimizer,
    batches: Iterable,
    hierarchy: HierarchySource | PrototypeHierarchy | None,
    steps: int,
    generator: torch.Generator | None = None,
) -> tuple[int, float]:
    """``steps`` training steps through ``train_epoch``; returns (samples, seconds).

    Seconds are :class:`~experiments.bench.common.ThreadClock` ``corrected`` seconds: wall time
    minus time this thread was preempted by other processes (one thread does all the work).
    """
    source = hierarchy if hasattr(hierarchy, "poll") else StaticHierarchy(hierarchy)
    clock = ThreadClock()
    stats, _ = train_epoch(
        model,
        batches,
        opt,
        epoch=0,
        step=0,
        total_steps=10_000,
        base_lr=0.05,
        warmup_steps=0,
        hierarchy=source,
        device=torch.device("cpu"),
        generator=generator,
        max_steps=steps,
    )
    return stats.samples, clock.read()["corrected"]


class Cycle:
    """Endless iteration over a list of batches (``train_epoch`` stops at ``max_steps``)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches
