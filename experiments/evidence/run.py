"""Does HIRL help its base method? One command: the same method with and without HIRL.

    python -m experiments.evidence.run                       # SimCLR, MoCo v2, SimSiam x 3 seeds
    python -m experiments.evidence.run --methods simclr --seeds 0 1 2 --epochs 10
    python -m experiments.evidence.run --data npz data.root=~/data/set.npz
    python -m experiments.evidence.fashion_mnist          # once: a real set with a label tree
    python -m experiments.evidence.run --data npz --name fashion_mnist \
        data.root=data/fashion_mnist data.image_size=28

Each (method, seed) pair trains twice from the method's preset (``experiments/small/<m>.yaml``)
with every setting equal except ``hirl.enabled``: same epochs, batch, lr, data order and
evaluation (kNN, k-means NMI/ARI/ACC/FM per label level, linear probe picked on a validation split
of train). Finished runs are kept and skipped when the command runs again. Results: one JSON per
run under ``results/evidence/<name>/`` (the run folders; ``--name`` defaults to ``--data``) and
``experiments/evidence/results/<name>.json`` + ``.md`` (mean ± std over seeds, and HIRL − base).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "results"
PROTOCOLS = ["knn", "clustering", "linear"]
#: Metric prefixes in the table, in column order (per label level).
COLUMNS = ("knn_acc", "linear_top1", "nmi")


def run_dir(name: str, method: str, seed: int, hirl: bool) -> Path:
    """``results/evidence/<name>/<method>-<hirl|base>-s<seed>``."""
    return REPO / "results" / "evidence" / name / f"{method}-{'hirl' if hirl else 'base'}-s{seed}"


def run_one(method: str, seed: int, hirl: bool, name: str, epochs: int | None,
            extra: list[str], folder: Path | None = None) -> dict[str, float]:
    """Fit (or reuse) one run (in ``folder``, default :func:`run_dir`); its final metrics."""
    import hirl_ray

    folder = folder or run_dir(name, method, seed, hirl)
    metrics_file = folder / "metrics.json"
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    overrides = [f"hirl.enabled={str(hirl).lower()}", f"train.seed={seed}",
                 f"eval.protocols={json.dumps(PROTOCOLS)}",
                 f"storage.path={folder.parent}", f"storage.name={folder.name}",
                 *([f"train.epochs={epochs}"] if epochs else []), *extra]
    preset = REPO / "experiments" / "small" / f"{method}.yaml"
    return dict(hirl_ray.fit(preset, overrides).metrics)


def summarise(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Mean ± std per (method, hirl) over seeds, and the HIRL − base difference of means."""
    seen = list(dict.fromkeys(k for r in rows for k in r["metrics"]))  # levels finest first
    keys = sorted((k for k in seen if k.partition("/")[0] in COLUMNS),
                  key=lambda k: (COLUMNS.index(k.partition("/")[0]), seen.index(k)))
    table: dict[str, Any] = {}
    for r in rows:
        cell = table.setdefault(r["method"], {}).setdefault("hirl" if r["hirl"] else "base", {})
        for k in keys:
            if k in r["metrics"]:
                cell.setdefault(k, []).append(float(r["metrics"][k]))
    lines = ["| method | HIRL | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    summary: dict[str, Any] = {}
    for method, arms in table.items():
        for arm in ("base", "hirl"):
            vals = arms.get(arm, {})
            stats = {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                     for k, v in vals.items()}
            summary.setdefault(method, {})[arm] = stats
            cells = [f"{stats[k][0]:.3f} ± {stats[k][1]:.3f}" if k in stats else "—" for k in keys]
            lines.append(f"| {method} | {'on' if arm == 'hirl' else 'off'} | " + " | ".join(cells)
                         + " |")
        base, on = summary[method].get("base", {}), summary[method].get("hirl", {})
        diff = [f"{on[k][0] - base[k][0]:+.3f}" if k in on and k in base else "—" for k in keys]
        lines.append(f"| {method} | Δ | " + " | ".join(diff) + " |")
    return summary, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["simclr", "mocov2", "simsiam"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data", default="synthetic", help="data.name (its data.* keys as overrides)")
    p.add_argument("--name", default=None, help="results name (default: --data)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs (default: the preset's)")
    p.add_argument("--summarise-only", action="store_true",
                   help="train nothing: summarise the runs that finished (e.g. after a stop)")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run (data.root=…)")
    args = p.parse_args(argv)
    extra = [f"data.name={args.data}", *args.overrides]
    name = args.name or args.data
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            for hirl in (False, True):
                done = run_dir(name, method, seed, hirl) / "metrics.json"
                if args.summarise_only and not done.is_file():
                    continue
                metrics = run_one(method, seed, hirl, name, args.epochs, extra)
                rows.append({"method": method, "seed": seed, "hirl": hirl, "metrics": metrics})
    summary, table = summarise(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(
        {"args": vars(args), "runs": rows, "summary": summary}, indent=2, default=float))
    (OUT / f"{name}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
