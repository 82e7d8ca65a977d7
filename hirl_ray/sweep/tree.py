"""The best trial's prototype tree as a picture: one row per level (coarsest on top), each
prototype a column of its nearest training images (cosine to the centroid, HIRL Eq. 4's
similarity), columns ordered by ancestor so children sit under their parents
(:func:`hirl_ray.eval.plots.prototype_tree_figure` draws it)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hirl_ray.config import from_dict
from hirl_ray.data import ViewDataset, build_dataset, eval_transform
from hirl_ray.eval.checkpoint import load_cluster_encoder
from hirl_ray.eval.features import extract_features
from hirl_ray.eval.plots import MAX_PROTOTYPES, nearest_images, prototype_tree_figure
from hirl_ray.hierarchy import latest_snapshot, load_hierarchy
from hirl_ray.runs import LAYOUT
from hirl_ray.train.checkpoint import read_meta

__all__ = ["MAX_PROTOTYPES", "nearest_images", "prototype_tree"]


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
    order = torch.argsort(idx)
    fig = prototype_tree_figure(h, feats[order], idx[order].numpy(), train.image,
                                f"Prototype tree of the best trial (hierarchy v{h.version})",
                                per_prototype)
    fig.savefig(path, dpi=110)
    return path
