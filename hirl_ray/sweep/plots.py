"""Figures of a sweep report (matplotlib, Agg): history, parallel coordinates, importance,
Pareto front, learning curves. Each function takes the results table and writes one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

STOPPED, FULL = "#d62728", "#1f77b4"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def history(table: pd.DataFrame, metric: str, mode: str, path: Path) -> Path:
    """Metric per trial in start order, best-so-far line; ASHA-stopped trials in red."""
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    y = table[metric].to_numpy(dtype=float)
    x = np.arange(1, len(y) + 1)
    stopped = table["stopped_early"].to_numpy(dtype=bool)
    ax.scatter(x[~stopped], y[~stopped], c=FULL, label="ran all epochs", zorder=3)
    ax.scatter(x[stopped], y[stopped], c=STOPPED, marker="x", label="stopped by ASHA", zorder=3)
    best = np.fmax.accumulate(y) if mode == "max" else np.fmin.accumulate(y)
    ax.step(x, best, where="post", c="k", lw=1, label="best so far")
    ax.set(xlabel="trial (start order)", ylabel=metric, title="Optimisation history")
    ax.legend(fontsize=8)
    return _save(fig, path)


def parallel_coordinates(table: pd.DataFrame, columns: Sequence[str], metric: str,
                         path: Path) -> Path:
    """One line per trial across depth, K_0, K_1, …, searched params; colour = metric."""
    cols = [c for c in columns if c in table.columns] + [metric]
    data = table[cols].apply(pd.to_numeric, errors="coerce")
    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(cols)), 3.8))
    lo, hi = data.min(), data.max()
    # A level the trial does not have (shallower hierarchy) sits on a "none" line below 0.
    norm = ((data - lo) / (hi - lo).replace(0, 1)).fillna(-0.15)
    score = data[metric].to_numpy(dtype=float)
    cmap = plt.get_cmap("viridis")
    s = (score - np.nanmin(score)) / max(np.nanmax(score) - np.nanmin(score), 1e-12)
    for i in range(len(norm)):
        row = norm.iloc[i].to_numpy(dtype=float)
        ax.plot(range(len(cols)), row, c=cmap(s[i]), alpha=0.85, lw=1.6,
                ls="--" if bool(table["stopped_early"].iloc[i]) else "-")
    ax.set_xticks(range(len(cols)), cols, rotation=20, fontsize=8)
    for j, c in enumerate(cols):
        ax.annotate(f"{lo[c]:.3g}", (j, 0), textcoords="offset points", xytext=(3, -10),
                    fontsize=7)
        ax.annotate(f"{hi[c]:.3g}", (j, 1), textcoords="offset points", xytext=(3, 4), fontsize=7)
        ax.axvline(j, c="0.8", lw=0.8, zorder=0)
    ax.set_yticks([-0.15], ["none"], fontsize=7)
    ax.set_ylim(-0.25, 1.1)
    ax.set_title("Parallel coordinates (dashed: stopped by ASHA)", fontsize=10)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(np.nanmin(score), np.nanmax(score)))
    fig.colorbar(sm, ax=ax, label=metric)
    return _save(fig, path)


def importance(values: dict[str, float], method: str, path: Path) -> Path:
    """Horizontal bars of parameter importance."""
    items = sorted(values.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * max(3, len(items)) + 1))
    ax.barh([k for k, _ in items], [v for _, v in items], color=FULL)
    ax.set(xlabel="importance", title=f"Parameter importance ({method})")
    return _save(fig, path)


def spearman_importance(table: pd.DataFrame, columns: Sequence[str], metric: str
                        ) -> dict[str, float]:
    """|Spearman rho| between each parameter and the metric (fallback for tiny sweeps)."""
    out = {}
    for c in columns:
        if c in table.columns and table[c].nunique() > 1:
            rho = spearmanr(table[c], table[metric], nan_policy="omit").statistic
            out[c] = float(abs(rho)) if np.isfinite(rho) else 0.0
    return out


def pareto(table: pd.DataFrame, front: pd.DataFrame, metrics: Sequence[str], path: Path) -> Path:
    """The first two objectives of every trial, Pareto-optimal ones highlighted."""
    a, b = metrics[0], metrics[1]
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    ax.scatter(table[a], table[b], c="0.6", label="trials")
    f = front.sort_values(a)
    ax.plot(f[a], f[b], "o-", c=STOPPED, label="Pareto front")
    for _, r in f.iterrows():
        ax.annotate(r["num_clusters"], (r[a], r[b]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set(xlabel=a, ylabel=b, title="Pareto front")
    ax.legend(fontsize=8)
    return _save(fig, path)


def learning_curves(results: list[dict], metrics: Sequence[str], path: Path) -> Path:
    """Loss terms and evaluation metrics per epoch of one trial (its Tune result.json)."""
    df = pd.DataFrame(results).sort_values("epoch")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in ("loss", "ssl_loss", "semantic_loss"):
        if k in df:
            ax1.plot(df["epoch"], df[k], marker="o", label=k)
    ax1.set(xlabel="epoch", ylabel="loss", title="Best trial: training losses")
    ax1.legend(fontsize=8)
    shown = [c for c in df.columns if c.startswith(("knn_acc/", "nmi/", "label_free/"))]
    for k in sorted(shown, key=lambda c: (c not in metrics, c)):
        ax2.plot(df["epoch"], df[k], marker="o", lw=2.5 if k in metrics else 1, label=k)
    ax2.set(xlabel="epoch", ylabel="score", title="Best trial: evaluation per epoch")
    ax2.legend(fontsize=7, ncol=2)
    return _save(fig, path)
