"""Does ``data.loader=ray_data`` train as well as the torch loader? One command, paired seeds.

    python -m experiments.evidence.loaders                 # seeds 0-7, the Ray Data test's fit
    python -m experiments.evidence.loaders --seeds 0 1 2 train.epochs=4

Each seed trains the same 2-worker fit twice (``tests/test_ray_data.py``'s: built-in set, 192
training images, SimCLR + HIRL, 2 epochs with 1 warm-up, global batch 32, synchronous
rebuilds), once per loader. The
two runs share the seed, so the initial weights; they differ in the data order and the
augmentation draws, which is all that differs between the loaders. Finished runs are kept and
skipped when the command runs again (``results/evidence/loaders/``). Results:
``experiments/evidence/results/loaders.{json,md}``: per seed, mean ± std per loader, and the
paired difference ray_data − torch with a bootstrap 95 % interval.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "results"
LOADERS = ("torch", "ray_data")
#: The fit of tests/test_ray_data.py (tests/conftest.py's tiny_config plus its FIT).
FIT = {"data.train_per_class": 8, "data.test_per_class": 20, "train.epochs": 2,
       "train.cpus_per_worker": 0.5, "data.ray_data_cpus": 0.5,
       "model.width": 16, "method.hidden_dim": 64, "method.proj_dim": 32,
       "hirl.num_clusters": [12, 4], "hirl.warmup_epochs": 1, "hirl.rebuild_every_epochs": 1,
       "hirl.num_neg_paths": 16, "hirl.kmeans_nredo": 1, "hirl.kmeans_iters": 10,
       "train.batch_size": 32, "train.num_workers": 2,
       # Rebuilds in step with training: with hirl.async_rebuild=true (the default) the steps
       # that train with the new hierarchy depend on wall time, and a Ray Data epoch here takes
       # 20-50x longer than a torch loader's, so the two loaders would train different mixes.
       "hirl.async_rebuild": False}
LEVELS = ("subclass", "class", "superclass")


def run_one(loader: str, seed: int, extra: list[str]) -> dict[str, float]:
    """Fit (or reuse) one run; its final metrics."""
    import hirl_ray

    folder = REPO / "results" / "evidence" / "loaders" / f"{loader}-s{seed}"
    metrics_file = folder / "metrics.json"
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    overrides = {**FIT, "data.loader": loader, "train.seed": seed,
                 "storage.path": str(folder.parent), "storage.name": folder.name}
    cfg = hirl_ray.load_config(None, overrides)
    return dict(hirl_ray.fit(hirl_ray.load_config(cfg, extra) if extra else cfg).metrics)


def bootstrap_ci(diffs: list[float], n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``diffs`` (resampling seeds)."""
    d = np.asarray(diffs, dtype=float)
    means = np.random.default_rng(seed).choice(d, (n, len(d))).mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Per level: each loader's mean ± std, the paired difference and its interval."""
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["loader"], r["seed"]): r["metrics"] for r in rows}
    summary: dict[str, Any] = {"seeds": seeds, "levels": {}}
    lines = ["| kNN accuracy | torch | ray_data | ray_data − torch (paired) | 95 % CI |",
             "|---|---|---|---|---|"]
    for level in LEVELS:
        key = f"knn_acc/{level}"
        vals = {ld: [by[(ld, s)][key] for s in seeds] for ld in LOADERS}
        diffs = [b - a for a, b in zip(vals["torch"], vals["ray_data"], strict=True)]
        lo, hi = bootstrap_ci(diffs)
        stat = {ld: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                     "values": v} for ld, v in vals.items()}
        summary["levels"][level] = {**stat, "diff_mean": statistics.mean(diffs),
                                    "diff_ci95": [lo, hi]}
        lines.append(f"| {level} | {stat['torch']['mean']:.3f} ± {stat['torch']['std']:.3f} | "
                     f"{stat['ray_data']['mean']:.3f} ± {stat['ray_data']['std']:.3f} | "
                     f"{statistics.mean(diffs):+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    lines += ["", "| seed | " + " | ".join(f"{ld} {lv}" for lv in LEVELS for ld in LOADERS) + " |",
              "|---" * (1 + 2 * len(LEVELS)) + "|"]
    for s in seeds:
        cells = [f"{by[(ld, s)][f'knn_acc/{lv}']:.3f}" for lv in LEVELS for ld in LOADERS]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return summary, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("overrides", nargs="*", help="key=value on top of the test's fit")
    args = p.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for loader in LOADERS:
            metrics = run_one(loader, seed, args.overrides)
            rows.append({"loader": loader, "seed": seed, "metrics": metrics})
            print(f"[loaders] seed {seed} {loader}: " + ", ".join(
                f"{lv} {metrics[f'knn_acc/{lv}']:.3f}" for lv in LEVELS), flush=True)
    summary, table = summarise(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "loaders.json").write_text(json.dumps({"rows": rows, "summary": summary,
                                                  "overrides": args.overrides}, indent=1))
    (OUT / "loaders.md").write_text(table)
    sys.stdout.write(table)


if __name__ == "__main__":
    main()
