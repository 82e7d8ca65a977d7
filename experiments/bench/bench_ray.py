"""Benchmark 5: what Ray Train costs, and what a second worker buys.

One training loop (:func:`loop`: the default experiment through ``train_epoch``, real data
loading, HIRL active against a fixed hierarchy), run

* in this process without Ray (the baseline),
* in a 1-worker ``TorchTrainer`` with the same batch and threads (target: ≥ 0.90 of baseline),
* in a 2-worker ``TorchTrainer`` (DDP over gloo, 1 thread each) vs a 1-worker one with 2 threads
  and the same global batch: the same cores either way. On a 2-core box expect about 1×; the
  figure matters on bigger machines and GPUs.

Samples/s are measured inside the loop after warm-up steps, on the training thread's clock
corrected for preemption by other processes (``ThreadClock``; raw wall clock too), so they
exclude start-up; the start-up cost (``ray.init``; ``fit`` wall time minus the loop's own time)
is reported apart.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from experiments.bench.common import cli, median, result, target

FULL = {"steps": 60, "warmup": 5, "repeats": 3, "scaling_repeats": 2}
QUICK = {"steps": 25, "warmup": 3, "repeats": 2, "scaling_repeats": 1}
BATCH = 64  # per worker in the overhead runs; global in the scaling runs
REPO = str(Path(__file__).resolve().parents[2])


def loop(config: dict[str, Any]) -> dict[str, float]:
    """The training loop; with ``in_ray`` it adds the Ray Train touch-points and reports."""
    start = time.perf_counter()
    from experiments.bench.common import ThreadClock
    from experiments.bench.harness import bench_config, build_model, feature_hierarchy, train_loader
    from hirl_ray.data import build_dataset
    from hirl_ray.train.loop import StaticHierarchy, train_epoch

    in_ray = config["in_ray"]
    world, rank = 1, 0
    if in_ray:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        world, rank = ctx.get_world_size(), ctx.get_world_rank()
    torch.set_num_threads(config["threads"])
    cfg = bench_config()
    model, opt = build_model(cfg, seed=0)
    h = feature_hierarchy(
        len(build_dataset(cfg.data, "train")), model.method.embedding_dim(cfg.hirl.embedding),
        cfg.hirl.num_clusters,
    )
    per_worker = config["batch"] // world
    loader = train_loader(cfg, per_worker)
    if in_ray:
        loader = ray.train.torch.prepare_data_loader(loader)  # Ray: DistributedSampler
        model = ray.train.torch.prepare_model(model)  # Ray: DDP when world > 1
    gen = torch.Generator().manual_seed(0)

    def run(n: int) -> dict[str, float]:
        clock, done = ThreadClock(), 0
        while done < n:  # epochs of the small dataset are short: chain them
            stats, _ = train_epoch(
                model,
                loader,
                opt,
                epoch=0,
                step=0,
                total_steps=10_000,
                base_lr=0.05,
                warmup_steps=0,
                hierarchy=StaticHierarchy(h),
                device=torch.device("cpu"),
                generator=gen,
                max_steps=n - done,
            )
            done += stats.steps
        return clock.read()

    run(config["warmup"])
    t = run(config["steps"])
    samples = config["steps"] * per_worker * world
    metrics = {
        "samples_per_s": samples / t["corrected"],
        "samples_per_s_wall": samples / t["wall"],
        "loop_s": time.perf_counter() - start,
        "world": world,
    }
    if in_ray:
        # Train V2 keeps no metrics reported without a checkpoint (ray PR #51204), so rank 0
        # also leaves them in a file for the driver (same machine).
        if rank == 0:
            Path(config["metrics_file"]).write_text(json.dumps(metrics))
        ray.train.report(metrics)  # Ray: every rank reports
    return metrics


def ray_fit(
    workers: int, threads: int, batch: int, p: dict[str, Any], storage: str
) -> tuple[dict[str, float], float]:
    """``loop`` in a TorchTrainer; returns rank 0's metrics and the ``fit`` wall seconds."""
    import ray.train
    from ray.train.torch import TorchTrainer

    metrics_file = Path(storage) / f"metrics-{time.time_ns()}.json"
    trainer = TorchTrainer(
        loop,
        train_loop_config={
            "in_ray": True,
            "threads": threads,
            "batch": batch,
            "steps": p["steps"],
            "warmup": p["warmup"],
            "metrics_file": str(metrics_file),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, resources_per_worker={"CPU": threads}
        ),
        run_config=ray.train.RunConfig(
            storage_path=storage, name=f"w{workers}t{threads}-{time.time_ns()}"
        ),
    )
    t0 = time.perf_counter()
    trainer.fit()
    return json.loads(metrics_file.read_text()), time.perf_counter() - t0


def run(quick: bool = False, **overrides: Any) -> dict[str, Any]:
    """Ray overhead (1 worker vs none), 2-worker scaling, start-up cost."""
    import ray

    started = time.perf_counter()
    p = {**(QUICK if quick else FULL), **overrides}
    cores = os.cpu_count() or 2
    t0 = time.perf_counter()
    # address="local": always our own Ray, even if another one runs on this machine.
    ray.init(
        address="local",
        num_cpus=max(2, cores),
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": REPO}},
    )
    init_s = time.perf_counter() - t0
    storage = tempfile.mkdtemp(prefix="hirl_bench_ray_")
    plain, in_ray, startup = [], [], []
    try:
        for _ in range(p["repeats"]):  # interleaved: no Ray, Ray, no Ray, Ray, ...
            plain.append(loop({"in_ray": False, "threads": 1, "batch": BATCH, **p}))
            metrics, wall = ray_fit(1, 1, BATCH, p, storage)
            in_ray.append(metrics)
            startup.append(wall - metrics["loop_s"])
        two, one_two = [], []
        for _ in range(p["scaling_repeats"]):
            two.append(ray_fit(2, 1, 2 * BATCH, p, storage)[0])
            one_two.append(ray_fit(1, 2, 2 * BATCH, p, storage)[0])
    finally:
        ray.shutdown()
    sps = {
        "no_ray": median([m["samples_per_s"] for m in plain]),
        "ray_1_worker": median([m["samples_per_s"] for m in in_ray]),
        "ray_2_workers_1_thread": median([m["samples_per_s"] for m in two]),
        "ray_1_worker_2_threads": median([m["samples_per_s"] for m in one_two]),
    }
    paired = median(
        [r["samples_per_s"] / b["samples_per_s"] for r, b in zip(in_ray, plain, strict=True)]
    )
    paired_wall = median(
        [
            r["samples_per_s_wall"] / b["samples_per_s_wall"]
            for r, b in zip(in_ray, plain, strict=True)
        ]
    )
    figures = {
        "samples_per_s": sps,
        "ray_over_no_ray": paired,
        "ray_over_no_ray_wall": paired_wall,
        "two_workers_over_one": sps["ray_2_workers_1_thread"] / sps["ray_1_worker_2_threads"],
        "ray_init_s": init_s,
        "fit_startup_s": median(startup),
        "runs": {
            "no_ray": plain,
            "ray_1_worker": in_ray,
            "ray_2_workers": two,
            "ray_1_worker_2_threads": one_two,
        },
    }
    targets = [
        target("1-worker TorchTrainer / no Ray samples/s", paired, ">=", 0.90),
        target(
            "1-worker TorchTrainer / no Ray, raw wall clock",
            paired_wall,
            ">=",
            0.90,
            "informative: includes other processes' preemption",
        ),
        target(
            "2 workers / 1 worker (same cores)",
            figures["two_workers_over_one"],
            ">=",
            1.0,
            f"informative; {cores} cores",
        ),
        target(
            "Ray start-up s (init + fit set-up)", init_s + median(startup), "<=", 30, "informative"
        ),
    ]
    notes = [
        f"batch {BATCH} per worker (overhead), global {2 * BATCH} (scaling); "
        f"{p['steps']} timed steps after {p['warmup']} warm-up steps; default experiment "
        "with HIRL active against a fixed hierarchy; gloo DDP for 2 workers; samples/s on "
        "the training thread's clock minus time preempted by other processes (schedstat; "
        "for DDP, waiting on a preempted peer still counts)",
        f"start-up: ray.init {init_s:.1f}s, TorchTrainer.fit set-up and tear-down "
        f"{median(startup):.1f}s per fit (median)",
    ]
    return result("ray", quick, p, figures, targets, notes, started)


if __name__ == "__main__":
    cli("ray", run, __doc__.splitlines()[0])
