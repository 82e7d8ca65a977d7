"""Why does HIRL (not) help? One setting changed at a time, scored on a validation split.

    python -m experiments.evidence.fashion_mnist        # once: data/fashion_mnist_val/
    python -m experiments.evidence.investigate          # SimCLR, seed 0, every row below
    python -m experiments.evidence.investigate --method mocov2 --rows default weight_0.5

Every row is the method's preset with HIRL on plus the row's overrides, trained on the train part
of ``data/fashion_mnist_val`` and scored (kNN, linear probe, k-means NMI per label level) on its
validation part - images carved from the training split, so choosing defaults here never looks at
the test split. ``base`` is the same run with HIRL off. Runs are kept under
``results/evidence/investigate/<method>/<row>-s<seed>`` and skipped when done; the table goes to
``experiments/evidence/results/investigate_<method>.md`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from experiments.evidence.run import COLUMNS, OUT, REPO, run_one

#: row -> overrides on top of the preset with HIRL on (one factor the issue names per row).
ROWS: dict[str, list[str]] = {
    "base": ["hirl.enabled=false"],
    "default": [],
    "embedding_backbone": ["hirl.embedding=backbone"],
    "warmup_5": ["hirl.warmup_epochs=5"],
    "rebuild_1": ["hirl.rebuild_every_epochs=1"],
    "clusters_30_10_3": ["hirl.num_clusters=[30,10,3]"],
    "clusters_120_30_10": ["hirl.num_clusters=[120,30,10]"],
    "weight_0.3": ["hirl.weight=0.3"],
    "weight_3": ["hirl.weight=3.0"],
    "neg_paths_20": ["hirl.num_neg_paths=20"],
    "neg_pooled": ["hirl.neg_average=pooled"],
    "epochs_20_base": ["hirl.enabled=false", "train.epochs=20"],
    "epochs_20": ["train.epochs=20"],
    "warmup_0": ["hirl.warmup_epochs=0"],
    "rebuild_4": ["hirl.rebuild_every_epochs=4"],
    "neg_paths_400": ["hirl.num_neg_paths=400"],
}


def table(runs: list[dict[str, Any]]) -> str:
    """One line per row: its overrides and mean (± std over seeds) of the evidence metrics."""
    seen = list(dict.fromkeys(k for r in runs for k in r["metrics"]))  # finest level first
    keys = sorted((k for k in seen if k.partition("/")[0] in COLUMNS),
                  key=lambda k: (COLUMNS.index(k.partition("/")[0]), seen.index(k)))
    lines = ["| row | overrides | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for row in dict.fromkeys(r["row"] for r in runs):
        cells = []
        for k in keys:
            vals = [float(r["metrics"][k]) for r in runs if r["row"] == row and k in r["metrics"]]
            sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.3f}{sd}" if vals else "—")
        change = ", ".join(f"`{o}`" for o in ROWS[row]) or "preset (HIRL on)"
        lines.append(f"| {row} | {change} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="simclr")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--data-root", type=Path, default=REPO / "data" / "fashion_mnist_val")
    p.add_argument("--summarise-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run")
    args = p.parse_args(argv)
    if not (args.data_root / "train.npz").is_file():
        raise SystemExit(f"{args.data_root}/train.npz missing: run "
                         "python -m experiments.evidence.fashion_mnist first")
    common = ["data.name=npz", f"data.root={args.data_root.resolve()}", "data.image_size=28",
              *args.overrides]
    rows = []
    for row in args.rows:
        for seed in args.seeds:
            folder = REPO / "results" / "evidence" / "investigate" / args.method / f"{row}-s{seed}"
            if args.summarise_only and not (folder / "metrics.json").is_file():
                continue
            hirl = "hirl.enabled=false" not in ROWS[row]
            metrics = run_one(args.method, seed, hirl, "investigate", None,
                              [*common, *ROWS[row]], folder=folder)
            rows.append({"row": row, "seed": seed, "metrics": metrics})
    text = table(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    stem = OUT / f"investigate_{args.method}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"args": {**vars(args), "data_root": str(args.data_root)}, "rows": ROWS, "runs": rows},
        indent=2, default=float))
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
