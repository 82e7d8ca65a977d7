"""A label-free metric for choosing a hierarchy: multi-level silhouette on held-out features.

Why this one. The sweep compares runs whose losses are not on one scale: the SSL/HIRL loss
depends on temperature, ``num_neg_paths`` and depth, so "lowest final loss" ranks the loss
settings, not the representation. Alignment/uniformity (Wang & Isola 2020) are comparable but
say nothing about the *hierarchy* being searched. The silhouette (Rousseeuw 1987) is the
classic label-free criterion for choosing the number of clusters, and it is bounded in
``[-1, 1]`` and computed on the same held-out images for every trial, so trials are
comparable. We score the trial's own cluster sizes: for each level ``l``, spherical k-means with
``K_l`` clusters on L2-normalised backbone features of the held-out (test) split, and the mean
cosine silhouette of that partition; the metric is the mean over levels. It rewards features
that split unseen images into ``K_0`` tight groups that merge cleanly into ``K_1``, … — what
a good prototype tree needs — and the depth/size that fit the data's own structure.

Caveat (documented in the README): a collapsed encoder puts everything in a few tight clumps
and can score high; the contrastive base methods here keep features spread (uniformity), and
the sweep report shows kNN next to it whenever labels exist. Pure PyTorch/sklearn, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import silhouette_score
from torch.utils.data import DataLoader

from hirl_ray.config import ExperimentConfig
from hirl_ray.data import ViewDataset, build_dataset, eval_transform
from hirl_ray.eval.checkpoint import load_backbone
from hirl_ray.eval.clustering import kmeans_labels
from hirl_ray.eval.features import extract_features

#: Held-out images scored at most (a seeded subset beyond this keeps the metric cheap).
MAX_SAMPLES = 2000


def hierarchy_silhouette(features: np.ndarray, num_clusters: Sequence[int], seed: int = 0) -> float:
    """Mean over levels of the cosine silhouette of ``K_l``-means on ``features``.

    Args:
        features: ``(N, D)`` held-out features (normalised inside).
        num_clusters: ``(K_0, ..., K_{L-1})``; levels with ``K_l >= N`` or ``K_l < 2`` are skipped.
        seed: k-means seed.

    Returns:
        A value in ``[-1, 1]`` (``nan`` if no level could be scored).
    """
    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    scores = []
    for k in num_clusters:
        if not 2 <= k < x.shape[0]:
            continue
        labels = kmeans_labels(x, k=int(k), seed=seed)
        if np.unique(labels).size < 2:
            scores.append(-1.0)  # everything in one cluster: the worst possible partition
            continue
        scores.append(float(silhouette_score(x, labels, metric="cosine")))
    return float(np.mean(scores)) if scores else float("nan")


class LabelFreeScorer:
    """Scores checkpoints of one run on its held-out split (the loader is built once)."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        test = build_dataset(cfg.data, "test")
        view = ViewDataset(test, eval_transform(cfg.data.image_size))
        if len(test) > MAX_SAMPLES:
            keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
            view = torch.utils.data.Subset(view, keep[:MAX_SAMPLES].tolist())
        self.loader = DataLoader(view, batch_size=256, shuffle=False)

    def __call__(self, checkpoint: str | Path) -> dict[str, float]:
        """``{"label_free/silhouette": s}`` for the checkpoint's backbone."""
        backbone, _ = load_backbone(checkpoint)
        with torch.no_grad():
            feats, _ = extract_features(backbone, self.loader, device="cpu", normalize=True)
        score = hierarchy_silhouette(feats.numpy(), self.cfg.hirl.num_clusters,
                                     seed=self.cfg.train.seed)
        return {"label_free/silhouette": score}
