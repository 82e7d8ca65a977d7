"""Pictures of an evaluation: 2-D embeddings of the test features and per-level metric bars.

* :func:`embedding_plot` — the test features projected to 2-D by PCA or t-SNE (van der Maaten
  & Hinton 2008, scikit-learn's ``TSNE``), one panel per label level (finest first), points
  coloured by that level's label, so one sees whether the fine classes sit inside their coarse
  groups (the structure HIRL's semantic path loss aims for, Xu et al. 2022, Sec. 3).
* :func:`level_bars` — grouped bars of per-level metrics (``<prefix>/<level>`` keys), e.g.
  clustering NMI/ARI/accuracy/Fowlkes–Mallows per label level.
* :func:`write_plots` — all of them for one evaluation, into a folder.

* :func:`prototype_tree_figure` — the prototype tree: one row per level (coarsest on top), each
  prototype a column of its nearest images; the sweep report (``hirl_ray/sweep/tree.py``) and
  a fit's TensorBoard (at every rebuild) draw it.

Figures are drawn on :class:`matplotlib.figure.Figure` objects (Agg canvas), never through
``pyplot``, so plotting neither needs a display nor switches the backend of the caller's
session. matplotlib and scikit-learn are imported on first use: ``import hirl_ray`` imports
every module of ``hirl_ray.eval``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hirl_ray.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable

    from matplotlib.figure import Figure

    from hirl_ray.eval.protocol import EvalInputs
    from hirl_ray.hierarchy import PrototypeHierarchy

log = get_logger(__name__)

#: Clustering metrics drawn by :func:`write_plots`, in this order, when present.
CLUSTERING_PREFIXES = ("nmi", "ari", "acc", "fm")
#: t-SNE runs on at most this many test samples (seeded draw); PCA uses them all.
TSNE_MAX_SAMPLES = 2000
EMBEDDINGS = ("pca", "tsne")
#: Prototypes per level row of the tree picture; the largest clusters when there are more.
MAX_PROTOTYPES = 16


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``(N, D)`` features → ``(N, 2)`` by PCA (scikit-learn) or t-SNE (perplexity ≤ 30)."""
    x = np.asarray(features, dtype=np.float32)
    if method not in EMBEDDINGS:
        raise ValueError(f"project_2d: method must be one of {EMBEDDINGS}, got {method!r}")
    if x.shape[0] < 3 or x.shape[1] < 2:
        return np.pad(x[:, :2], ((0, 0), (0, max(0, 2 - x.shape[1]))))
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (x.shape[0] - 1) / 3.0))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                max_iter=500).fit_transform(x)


def embedding_plot(features: np.ndarray | torch.Tensor, labels: np.ndarray,
                   level_names: Sequence[str], path: str | Path, method: str = "pca",
                   seed: int = 0, title: str = "") -> Path:
    """Scatter the 2-D projection of ``features``, one panel per label level.

    Args:
        features: ``(N, D)`` features (e.g. the L2-normalised test features).
        labels: ``(N, L)`` labels, finest first; ``-1`` (unlabelled) drawn grey. ``L == 0``
            gives one uncoloured panel.
        level_names: ``L`` names, the panel titles.
        path: The PNG to write.
        method: ``"pca"`` or ``"tsne"`` (on at most :data:`TSNE_MAX_SAMPLES` samples).
        seed: Seed of the t-SNE subsample and optimisation.
        title: Figure title.
    """
    x = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    y = np.asarray(labels).reshape(len(x), -1)
    if method == "tsne" and len(x) > TSNE_MAX_SAMPLES:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), TSNE_MAX_SAMPLES,
                                                          replace=False))
        x, y = x[keep], y[keep]
    xy = project_2d(x, method, seed)
    size = float(np.clip(3000.0 / max(1, len(xy)), 3.0, 25.0))  # visible dots, few or many
    panels = list(range(y.shape[1])) or [None]
    fig = _figure(4.2 * len(panels), 4.0)
    for i, level in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if level is None:
            ax.scatter(xy[:, 0], xy[:, 1], s=size, c="#1f77b4", alpha=0.6, linewidths=0)
            ax.set_title("unlabelled", fontsize=9)
        else:
            _scatter_by_label(ax, xy, y[:, level], size)
            ax.set_title(f"coloured by {level_names[level]} "
                         f"({len(np.unique(y[y[:, level] >= 0, level]))} labels)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    name = {"pca": "PCA", "tsne": f"t-SNE ({len(x)} samples)"}[method]
    fig.suptitle(f"{title + ': ' if title else ''}{name} of the test features", fontsize=10)
    return _save(fig, path)


def _scatter_by_label(ax, xy: np.ndarray, y: np.ndarray, size: float) -> None:
    from matplotlib import colormaps

    missing = y < 0
    if missing.any():
        ax.scatter(xy[missing, 0], xy[missing, 1], s=size, c="#bbbbbb", linewidths=0)
    classes = np.unique(y[~missing])
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20
                     else "turbo"]
    for j, c in enumerate(classes):
        sel = y == c
        color = cmap(j) if len(classes) <= 20 else cmap(j / max(1, len(classes) - 1))
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=color, alpha=0.7, linewidths=0,
                   label=str(c))
    if 0 < len(classes) <= 20:
        ax.legend(fontsize=6, markerscale=max(1.0, 12.0 / size), ncol=2 if len(classes) > 10 else 1,
                  loc="best", frameon=False)


def level_bars(metrics: Mapping[str, float], prefixes: Sequence[str],
               level_names: Sequence[str], path: str | Path, title: str = "") -> Path | None:
    """Grouped bars: one group per label level, one bar per ``<prefix>/<level>`` present.

    Returns ``None`` (and writes nothing) when no such key is in ``metrics``.
    """
    present = [p for p in prefixes if any(f"{p}/{lvl}" in metrics for lvl in level_names)]
    levels = [lvl for lvl in level_names if any(f"{p}/{lvl}" in metrics for p in present)]
    if not present:
        return None
    fig = _figure(max(4.0, 1.2 + 0.5 * len(present) * len(levels)), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(present)
    for i, prefix in enumerate(present):
        values = [float(metrics.get(f"{prefix}/{lvl}", np.nan)) for lvl in levels]
        pos = np.arange(len(levels)) + (i - (len(present) - 1) / 2) * width
        bars = ax.bar(pos, values, width, label=prefix)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(np.arange(len(levels)), levels)
    top = max([1.0, *(float(metrics[f"{p}/{lvl}"]) for p in present for lvl in levels
                      if f"{p}/{lvl}" in metrics)])
    ax.set_ylim(min(0.0, *(float(metrics.get(f"{p}/{lvl}", 0.0)) for p in present
                           for lvl in levels)), top * 1.12)
    ax.set_ylabel("score")
    ax.set_xlabel("label level (finest first)")
    ax.legend(fontsize=8, ncol=len(present), loc="upper center", frameon=False)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def level_prefixes(metrics: Mapping[str, float], level_names: Sequence[str]) -> list[str]:
    """Prefixes of the keys ``<prefix>/<level>`` in ``metrics`` (first-seen order)."""
    levels = set(level_names)
    return list(dict.fromkeys(k.rpartition("/")[0] for k in metrics
                              if "/" in k and k.rpartition("/")[2] in levels))


def write_plots(inputs: EvalInputs, metrics: Mapping[str, float], out_dir: str | Path,
                title: str = "", embeddings: Sequence[str] = EMBEDDINGS) -> list[Path]:
    """The evaluation's pictures, as PNGs in ``out_dir``.

    ``embedding_<method>.png`` (test features, :func:`embedding_plot`), ``clustering.png``
    (:data:`CLUSTERING_PREFIXES` per level) and ``level_metrics.png`` (every other per-level
    metric, e.g. kNN and linear-probe accuracy), the latter two only when such metrics exist.
    Reuses the features ``inputs`` already extracted (extracts the test split if no protocol
    did).

    Returns:
        The files written.
    """
    out = Path(out_dir)
    feats, seen = inputs.features("test")
    mask = torch.from_numpy(seen)
    labels = inputs.test_labels[seen][:, :inputs.num_levels]
    names = inputs.level_names[:inputs.num_levels]
    written = [embedding_plot(feats[mask], labels, names, out / f"embedding_{m}.png", m,
                              seed=inputs.seed, title=title) for m in embeddings]
    prefixes = level_prefixes(metrics, names)
    clustering = [p for p in CLUSTERING_PREFIXES if p in prefixes]
    others = [p for p in prefixes if p not in CLUSTERING_PREFIXES]
    for file, chosen, what in (("clustering.png", clustering, "k-means clustering (test split)"),
                               ("level_metrics.png", others, "per-level metrics")):
        path = level_bars(metrics, chosen, names, out / file,
                          f"{title + ': ' if title else ''}{what}")
        if path is not None:
            written.append(path)
    log.info("evaluation plots: %s", ", ".join(str(p) for p in written))
    return written


def _as_hwc(image) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return image.permute(1, 2, 0).numpy()
    return np.asarray(image.convert("RGB"))


def _column_order(h: PrototypeHierarchy, level: int, counts: np.ndarray) -> np.ndarray:
    """Prototypes of ``level`` sorted by their path to the top, then by size."""
    k = h.num_clusters[level]
    keys = []
    for c in range(k):
        path, node = [], c
        for parent in h.parents[level:]:
            node = int(parent[node])
            path.append(node)
        keys.append((tuple(reversed(path)), -int(counts[c]), c))
    shown = set(sorted(range(k), key=lambda c: -int(counts[c]))[:MAX_PROTOTYPES])
    return np.array([c for *_, c in sorted(keys) if c in shown])


def nearest_images(features: torch.Tensor, centroids: torch.Tensor, n: int) -> np.ndarray:
    """``(K, n)`` row indices of ``features`` most similar (cosine) to each centroid."""
    f = torch.nn.functional.normalize(features.float(), dim=1)
    c = torch.nn.functional.normalize(centroids.float().to(f.device), dim=1)
    return (c @ f.T).topk(min(n, f.shape[0]), dim=1).indices.cpu().numpy()


def prototype_tree_figure(h: PrototypeHierarchy, features: torch.Tensor, sample_ids: np.ndarray,
                          image_of: Callable[[int], object], title: str,
                          per_prototype: int = 3) -> Figure:
    """The prototype tree as a figure (HIRL Sec. 3.1's hierarchy, seen through its images).

    Args:
        h: The hierarchy (CPU tensors).
        features: ``(M, D)`` features in the space k-means ran in (``hirl.embedding``).
        sample_ids: ``(M,)`` dataset index of each feature row (``image_of`` takes these).
        image_of: Dataset index → PIL image or ``(3, H, W)`` tensor, all of one size.
        title: The figure's title.
        per_prototype: Nearest images shown under each prototype.
    """
    rows = list(reversed(range(h.num_levels)))  # coarsest level on top
    fig = _figure(min(16, 1.0 + 0.9 * MAX_PROTOTYPES), 1.0 + 1.0 * per_prototype * len(rows))
    axes = fig.subplots(len(rows), 1, squeeze=False)
    for ax, level in zip(axes[:, 0], rows, strict=True):
        assign = h.assignments[level].cpu().numpy()
        counts = np.bincount(assign[assign >= 0], minlength=h.num_clusters[level])
        order = _column_order(h, level, counts)
        near = nearest_images(features, h.centroids[level][order], per_prototype)
        tiles = [[_as_hwc(image_of(int(sample_ids[i]))) for i in col] for col in near]
        s, pad = tiles[0][0].shape[0], 4
        canvas = np.full((per_prototype * (s + pad), len(order) * (s + pad), 3), 255, np.uint8)
        for j, col in enumerate(tiles):
            for r, img in enumerate(col):
                canvas[r * (s + pad):r * (s + pad) + s, j * (s + pad):j * (s + pad) + s] = img
        ax.imshow(canvas, interpolation="nearest")
        ax.set_xticks([(j + 0.5) * (s + pad) for j in range(len(order))])
        parents = h.parents[level].cpu().numpy() if level < h.num_levels - 1 else None
        ax.set_xticklabels([f"{c}" + (f"→{parents[c]}" if parents is not None else "")
                            for c in order], fontsize=7)
        ax.set_yticks([])
        more = f", showing the {len(order)} largest" if len(order) < h.num_clusters[level] else ""
        ax.set_title(f"level {level}: {h.num_clusters[level]} prototypes{more} "
                     "(label: id→parent; images: nearest training samples)", fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
