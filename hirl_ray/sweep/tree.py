"""The best trial's prototype tree as a picture: one row per level (coarsest on top), each
prototype a column of its nearest training images (cosine to the centroid, HIRL Eq. 4's
similarity), columns ordered by ancestor so children sit under their parents."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from hirl_ray.config import from_dict  # noqa: E402
from hirl_ray.data import ViewDataset, build_dataset, eval_transform  # noqa: E402
from hirl_ray.eval.checkpoint import load_cluster_encoder  # noqa: E402
from hirl_ray.eval.features import extract_features  # noqa: E402
from hirl_ray.hierarchy import PrototypeHierarchy, latest_snapshot, load_hierarchy  # noqa: E402
from hirl_ray.runs import LAYOUT  # noqa: E402
from hirl_ray.train.checkpoint import read_meta  # noqa: E402

MAX_PROTOTYPES = 16  # per level row; the largest clusters are shown when there are more


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
    shown = sorted(range(k), key=lambda c: -int(counts[c]))[:MAX_PROTOTYPES]
    return np.array([c for *_, c in sorted(keys) if c in set(shown)])


def nearest_images(features: torch.Tensor, centroids: torch.Tensor, n: int) -> np.ndarray:
    """``(K, n)`` indices of the training samples most similar (cosine) to each centroid."""
    f = torch.nn.functional.normalize(features.float(), dim=1)
    c = torch.nn.functional.normalize(centroids.float(), dim=1)
    return (c @ f.T).topk(min(n, f.shape[0]), dim=1).indices.numpy()


def prototype_tree(run_dir: str | Path, checkpoint: str | Path, path: Path,
                   per_prototype: int = 3) -> Path | None:
    """Draw the run's newest hierarchy snapshot; ``None`` when the run has none."""
    snap = latest_snapshot(LAYOUT.hierarchy_dir(run_dir))
    if snap is None:
        return None
    h = load_hierarchy(snap)
    cfg = from_dict(read_meta(checkpoint).config)
    # Centroids live where k-means ran (hirl.embedding), not necessarily in backbone space.
    encoder = load_cluster_encoder(checkpoint)
    train = build_dataset(cfg.data, "train")
    loader = DataLoader(ViewDataset(train, eval_transform(cfg.data.image_size)), batch_size=256)
    with torch.no_grad():
        feats, idx = extract_features(encoder, loader, device="cpu", normalize=True)
    feats = feats[torch.argsort(idx)]
    rows = list(reversed(range(h.num_levels)))  # coarsest level on top
    fig, axes = plt.subplots(len(rows), 1, squeeze=False,
                             figsize=(min(16, 1.0 + 0.9 * MAX_PROTOTYPES),
                                      1.0 + 1.0 * per_prototype * len(rows)))
    for ax, level in zip(axes[:, 0], rows, strict=True):
        assign = h.assignments[level].numpy()
        counts = np.bincount(assign[assign >= 0], minlength=h.num_clusters[level])
        order = _column_order(h, level, counts)
        near = nearest_images(feats, h.centroids[level][order], per_prototype)
        tiles = [[_as_hwc(train.image(int(i))) for i in col] for col in near]
        s = tiles[0][0].shape[0]
        pad = 4
        canvas = np.full((per_prototype * (s + pad), len(order) * (s + pad), 3), 255, np.uint8)
        for j, col in enumerate(tiles):
            for r, img in enumerate(col):
                canvas[r * (s + pad):r * (s + pad) + s, j * (s + pad):j * (s + pad) + s] = img
        ax.imshow(canvas, interpolation="nearest")
        ax.set_xticks([(j + 0.5) * (s + pad) for j in range(len(order))])
        parents = h.parents[level].numpy() if level < h.num_levels - 1 else None
        ax.set_xticklabels([f"{c}" + (f"→{parents[c]}" if parents is not None else "")
                            for c in order], fontsize=7)
        ax.set_yticks([])
        more = f", showing the {len(order)} largest" if len(order) < h.num_clusters[level] else ""
        ax.set_title(f"level {level}: {h.num_clusters[level]} prototypes{more} "
                     "(label: id→parent; images: nearest training samples)", fontsize=9)
    fig.suptitle(f"Prototype tree of the best trial (hierarchy v{h.version})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
