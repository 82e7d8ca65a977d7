"""Benchmark 4: what HIRL adds to a training step, for every base method.

The same batches, backbone and initial weights, with ``hirl.enabled`` false (the base method)
and true (per-level heads + semantic-path loss against a built hierarchy), timed in interleaved
single steps through the project's ``train_epoch``. Data loading is excluded (batches are
augmented once up front): the ratio is about the step itself. Also one informative row with
the paper's negatives (``M = 1000``) and a larger tree ``[3000, 1000, 100]``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from experiments.bench.bench_path_loss import random_hierarchy
from experiments.bench.common import cli, median, result, target
from experiments.bench.harness import (
    STEP_BATCH,
    Cycle,
    bench_config,
    build_model,
    feature_hierarchy,
    fixed_batches,
    run_steps,
)
from hirl_ray.data import build_dataset
from hirl_ray.methods import METHODS

FULL = {"steps": 20, "repeats": 7}
QUICK = {"steps": 8, "repeats": 3}
LARGE = {"hirl.num_clusters": [3000, 1000, 100], "hirl.num_neg_paths": 1000}


def step_ratio(
    overrides: dict[str, Any], steps: int, repeats: int, hierarchy_fn: Any = None
) -> dict[str, Any]:
    """Median seconds per step with HIRL off and on, steps alternating between the two."""
    cfg_on = bench_config(overrides)
    cfg_off = bench_config({**overrides, "hirl.enabled": False})
    off, opt_off = build_model(cfg_off, seed=0)
    on, opt_on = build_model(cfg_on, seed=0)  # same seed: same backbone and base heads
    batches = Cycle(fixed_batches(cfg_on, STEP_BATCH, 4))
    n = len(build_dataset(cfg_on.data, "train"))
    dim = on.method.embedding_dim(cfg_on.hirl.embedding)  # what the heads and k-means see
    if hierarchy_fn is None:
        h = feature_hierarchy(n, dim, cfg_on.hirl.num_clusters)
    else:
        h = hierarchy_fn(cfg_on, dim, n)
    gen = torch.Generator().manual_seed(0)
    run_steps(off, opt_off, batches, None, 2)  # warm-up both
    run_steps(on, opt_on, batches, h, 2, gen)
    t_off, t_on = [], []
    # Alternate single steps (off, on, off, on, ...): on a shared machine the load changes
    # within seconds, and per-step alternation exposes both variants to the same load.
    for _ in range(repeats * steps):
        t_off.append(run_steps(off, opt_off, batches, None, 1)[1])
        t_on.append(run_steps(on, opt_on, batches, h, 1, gen)[1])
    return {
        "off_step_s": median(t_off),
        "on_step_s": median(t_on),
        "ratio": median(t_on) / median(t_off),
        "clusters": list(cfg_on.hirl.num_clusters),
        "num_neg_paths": cfg_on.hirl.num_neg_paths,
        "batch": STEP_BATCH,
        "backbone": cfg_on.model.backbone,
    }


def _large_tree(cfg: Any, dim: int, n: int) -> Any:
    return random_hierarchy(cfg.hirl.num_clusters, dim, n, seed=0, device="cpu")


def run(
    quick: bool = False, methods: tuple[str, ...] = tuple(METHODS), **overrides: Any
) -> dict[str, Any]:
    """Ratio HIRL-on / HIRL-off step time per method (default experiment) + a large-tree row."""
    started = time.perf_counter()
    p = {**(QUICK if quick else FULL), **overrides}
    figures: dict[str, Any] = {}
    for name in methods:
        figures[name] = step_ratio({"method.name": name}, p["steps"], p["repeats"])
    figures["simclr_large_tree"] = step_ratio(
        {"method.name": "simclr", **LARGE}, p["steps"], p["repeats"], _large_tree
    )
    targets = [
        target(f"{name}: step time HIRL on / off", figures[name]["ratio"], "<=", 1.15)
        for name in methods
    ]
    large = figures["simclr_large_tree"]
    notes = [
        f"default experiment: small_cnn, 32 px, batch {STEP_BATCH} (one worker's share of "
        "128), hirl.num_clusters [48, 12, 4], 100 negative paths; CPU, "
        f"{torch.get_num_threads()} thread(s); data loading excluded",
        f"informative: simclr with clusters {large['clusters']} and "
        f"{large['num_neg_paths']} negatives: ×{large['ratio']:.2f}",
    ]
    return result("hirl_overhead", quick, p, figures, targets, notes, started)


if __name__ == "__main__":
    cli("hirl_overhead", run, __doc__.splitlines()[0])
