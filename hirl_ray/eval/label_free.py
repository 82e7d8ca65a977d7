"""Label-free criteria for choosing a hierarchy, and the ``label_free`` evaluation protocol.

People pretrain on images nobody labelled; a sweep over depth and cluster sizes then needs a
score that ranks trials the way downstream accuracy would, computed from the trial's own
backbone on held-out images. Each criterion is one pure function here; higher is better for
all of them (``label_free/<name>``):

* ``rankme`` — RankMe (Garrido et al., ICML 2023, Eq. 1): the effective rank
  ``exp(-sum_k p_k log p_k)``, ``p_k = sigma_k / ||sigma||_1 + eps``, of the embedding matrix.
* ``alpha_req`` — alpha-ReQ (Agrawal et al., NeurIPS 2022): the eigenspectrum of the feature
  covariance decays as ``lambda_i ~ i^-alpha``; accuracy peaks near ``alpha = 1`` (Sec. 4), so the
  score is ``-|alpha - 1|`` (``label_free/alpha`` reports alpha itself; collapsed features have
  ``alpha = inf`` and score the floor, -10).
* ``silhouette`` — the baseline: mean over levels of the cosine silhouette (Rousseeuw 1987) of
  ``K_l``-means on the held-out features, ``K_l`` the trial's own cluster sizes.
* ``stability`` — hierarchy-aware: the trial's own hierarchical k-means (level 0 clusters the
  features, level ``l`` clusters level ``l-1``'s centroids, as HIRL builds its tree) fitted on
  two random halves-and-more (``stability_fraction``) of the held-out images; every image gets
  a path from each fit and the two labelings are compared with the adjusted Rand index, per
  level, averaged over levels and ``stability_rounds`` pairs. This is the classic label-free way
  to choose ``K`` (Ben-Hur et al. 2002; Lange et al. 2004): a tree the data supports is found
  again on other samples; the ARI is chance-corrected, so "one huge cluster" scores 0.
* ``tree_knn`` — hierarchy-aware, the run's own tree: Cohen's kappa between each training
  image's prototype at level ``l`` and the majority prototype of its ``knn_k`` nearest
  neighbours in backbone space (leave-one-out), averaged over levels; 0 before the first tree.

A collapsed encoder scores lowest on each (rank 1; a spectrum that falls off a cliff; one
cluster; chance agreement), which the tests check together with a random encoder.

Pure numpy / scikit-learn / faiss; nothing here imports ``ray``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, cohen_kappa_score, silhouette_score

from hirl_ray.config import ConfigError, check_choice
from hirl_ray.eval.clustering import kmeans_labels
from hirl_ray.eval.protocol import EvalInputs, EvalProtocol, register_protocol

PREFIX = "label_free"
#: Below this total variance the features are one point: every criterion scores its minimum.
_COLLAPSED = 1e-10


def _matrix(features: np.ndarray | torch.Tensor) -> np.ndarray:
    x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"label-free criteria need (N >= 2, D) features, got shape {x.shape}")
    return x


def _collapsed(x: np.ndarray) -> bool:
    return float(x.var(axis=0).sum()) < _COLLAPSED


def rankme(features: np.ndarray | torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023, Eq. 1): smooth rank of ``features`` in ``[1, min(N, D)]``."""
    sigma = np.linalg.svd(_matrix(features), compute_uv=False)
    if sigma.sum() <= 0:
        return 1.0
    p = sigma / sigma.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def eigenspectrum_decay(features: np.ndarray | torch.Tensor, skip: int = 1,
                        floor: float = 1e-8) -> float:
    """alpha of alpha-ReQ: minus the slope of ``log lambda_i`` against ``log i``.

    ``lambda_i`` are the covariance eigenvalues (descending), floored at ``floor * lambda_1``
    so that a collapsed direction counts as a steep fall rather than ``log 0``; the first
    ``skip`` eigenvalues are left out of the least-squares fit (the tail carries the decay).
    """
    x = _matrix(features)
    x = x - x.mean(axis=0)
    lam = np.linalg.svd(x, compute_uv=False) ** 2 / max(x.shape[0] - 1, 1)
    if lam.size < skip + 2 or _collapsed(x):
        return float("inf")
    lam = np.maximum(lam, floor * lam[0])
    i = np.arange(1, lam.size + 1)[skip:]
    slope = np.polyfit(np.log(i), np.log(lam[skip:]), 1)[0]
    return float(-slope)


#: alpha-ReQ's score is floored here (collapsed features have alpha = inf).
ALPHA_REQ_FLOOR = -10.0


def alpha_req_score(alpha: float) -> float:
    """``-|alpha - 1|``: 0 for the ``1/i`` spectrum alpha-ReQ finds best, lower either side
    (at least :data:`ALPHA_REQ_FLOOR`)."""
    return max(-abs(alpha - 1.0), ALPHA_REQ_FLOOR)


def alpha_req(features: np.ndarray | torch.Tensor) -> float:
    """:func:`alpha_req_score` of the features' :func:`eigenspectrum_decay`."""
    return alpha_req_score(eigenspectrum_decay(features))


def hierarchy_silhouette(features: np.ndarray | torch.Tensor, num_clusters: Sequence[int],
                         seed: int = 0) -> float:
    """Mean over levels of the cosine silhouette of ``K_l``-means on ``features``.

    Levels with ``K_l >= N`` or ``K_l < 2`` are skipped; one cluster, or features that are all
    one point, score -1 (the worst partition). Returns a value in ``[-1, 1]`` (``nan`` if no
    level could be scored).
    """
    x = _unit(_matrix(features))
    scores = []
    for k in num_clusters:
        if not 2 <= k < x.shape[0]:
            continue
        labels = kmeans_labels(x, k=int(k), seed=seed) if not _collapsed(x) else np.zeros(len(x))
        if np.unique(labels).size < 2:
            scores.append(-1.0)
            continue
        scores.append(float(silhouette_score(x, labels, metric="cosine")))
    return float(np.mean(scores)) if scores else float("nan")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _centroids(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    c = np.zeros((k, x.shape[1]))
    np.add.at(c, labels, x)
    return _unit(c)


def tree_paths(fit_on: np.ndarray, label: np.ndarray, num_clusters: Sequence[int],
               seed: int = 0) -> list[np.ndarray]:
    """Hierarchical spherical k-means on ``fit_on``; each row of ``label`` gets its path.

    Level 0 clusters ``fit_on`` into ``K_0``; level ``l`` clusters level ``l-1``'s centroids
    into ``K_l`` (HIRL Sec. 3.1). A row of ``label`` takes its nearest level-0 centroid and then
    the parent map, so both fits of :func:`cluster_stability` label the same images.
    """
    points, paths, parent_of = _unit(fit_on), [], None
    for level, k in enumerate(num_clusters):
        k = min(int(k), points.shape[0])
        assign = kmeans_labels(points, k=k, seed=seed + level)
        centroids = _centroids(points, assign, k)
        if parent_of is None:
            parent_of = np.argmax(_unit(label) @ centroids.T, axis=1)
        else:
            parent_of = assign[parent_of]
        paths.append(parent_of)
        points = centroids
    return paths


def cluster_stability(features: np.ndarray | torch.Tensor, num_clusters: Sequence[int],
                      rounds: int = 3, fraction: float = 0.8, seed: int = 0) -> float:
    """Mean ARI, over levels and ``rounds`` pairs of subsamples, between two hierarchical
    k-means fits' paths of every image (see the module docstring). In ``[-0.5, 1]``; 0 for
    collapsed features."""
    x = _matrix(features)
    sizes = [int(k) for k in num_clusters if 2 <= k]
    n_fit = int(round(fraction * x.shape[0]))
    if _collapsed(x) or not sizes or n_fit < max(sizes):
        return 0.0
    rng = np.random.default_rng(seed)
    scores = []
    for r in range(rounds):
        a, b = (tree_paths(x[rng.choice(x.shape[0], n_fit, replace=False)], x, sizes,
                           seed=seed + 100 * (2 * r + j)) for j in (0, 1))
        scores += [adjusted_rand_score(pa, pb) for pa, pb in zip(a, b, strict=True)]
    return float(np.mean(scores))


def tree_knn_agreement(features: np.ndarray | torch.Tensor,
                       assignments: Sequence[np.ndarray | torch.Tensor], k: int = 10) -> float:
    """Mean over levels of Cohen's kappa between each row's prototype and the majority
    prototype of its ``k`` nearest other rows (cosine); 0 = chance, 1 = the tree's clusters are
    exactly the backbone's neighbourhoods."""
    x = _unit(_matrix(features))
    if _collapsed(x):
        return 0.0
    k = min(k, x.shape[0] - 1)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    neighbours = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    scores = []
    for a in assignments:
        a = np.asarray(a.cpu().numpy() if isinstance(a, torch.Tensor) else a).astype(np.int64)
        votes = np.zeros((a.size, int(a.max()) + 1))
        np.add.at(votes, (np.repeat(np.arange(a.size), k), a[neighbours].reshape(-1)), 1.0)
        predicted = votes.argmax(axis=1)
        both = np.union1d(a, predicted)
        scores.append(0.0 if both.size < 2 else float(cohen_kappa_score(a, predicted)))
    return float(np.mean(scores)) if scores else 0.0


#: Criterion name -> what it needs: ``"features"`` or ``"tree"`` (the run's hierarchy too).
CRITERIA: dict[str, str] = {"rankme": "features", "alpha_req": "features",
                            "silhouette": "features", "stability": "features",
                            "tree_knn": "tree"}


def criterion_metrics(names: Sequence[str] = tuple(CRITERIA)) -> tuple[str, ...]:
    """The metric keys of ``names`` (``label_free/rankme``, ...)."""
    return tuple(f"{PREFIX}/{n}" for n in names)


@dataclass(frozen=True)
class LabelFreeConfig:
    """``eval.params.label_free``: which criteria, on how many held-out images.

    ``cluster_sizes`` default to the run's ``hirl.num_clusters`` (or its tree's sizes).
    """

    criteria: tuple[str, ...] = tuple(CRITERIA)
    max_samples: int = 2000
    stability_rounds: int = 3
    stability_fraction: float = 0.8
    knn_k: int = 10

    def check(self, where: str) -> None:
        for name in self.criteria:
            check_choice(f"{where}.criteria", name, tuple(CRITERIA))
        if self.max_samples < 10 or self.stability_rounds < 1 or self.knn_k < 1:
            raise ConfigError(f"{where}: max_samples must be >= 10, stability_rounds and knn_k "
                              f">= 1, got {self.max_samples}, {self.stability_rounds}, "
                              f"{self.knn_k}")
        if not 0.2 <= self.stability_fraction < 1:
            raise ConfigError(f"{where}.stability_fraction must be in [0.2, 1), got "
                              f"{self.stability_fraction}")


def _subset(x: torch.Tensor, seen: np.ndarray, limit: int, seed: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Rows the loader yielded, at most ``limit`` of them (seeded): ``(features, rows)``."""
    rows = np.flatnonzero(seen)
    if rows.size > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    return x[torch.from_numpy(rows)].numpy(), rows


@register_protocol
class LabelFreeProtocol(EvalProtocol):
    """``label_free/<criterion>`` on the test split (``tree_knn``: on the train split, whose
    rows the run's tree assigns). Needs no labels: selectable as ``tune.metric`` on unlabelled
    data."""

    name = "label_free"
    Config = LabelFreeConfig
    metric_prefixes = (PREFIX,)

    def run(self, inputs: EvalInputs) -> dict[str, float]:
        cfg: LabelFreeConfig = self.config
        h = inputs.hierarchy
        sizes = ([int(c.shape[0]) for c in h.centroids] if h is not None
                 else list(inputs.cluster_sizes))
        out: dict[str, float] = {}
        feature_criteria = [c for c in cfg.criteria if CRITERIA[c] == "features"]
        if feature_criteria:
            feats, _ = _subset(*inputs.features("test"), cfg.max_samples, inputs.seed)
            scorers: dict[str, Callable[[], float]] = {
                "rankme": lambda: rankme(feats),
                "alpha_req": lambda: alpha_req_score(out[f"{PREFIX}/alpha"]),
                "silhouette": lambda: hierarchy_silhouette(feats, sizes, inputs.seed),
                "stability": lambda: cluster_stability(feats, sizes, cfg.stability_rounds,
                                                       cfg.stability_fraction, inputs.seed),
            }
            if "alpha_req" in feature_criteria:  # one SVD for alpha and its score
                out[f"{PREFIX}/alpha"] = eigenspectrum_decay(feats)
            for name in feature_criteria:
                out[f"{PREFIX}/{name}"] = scorers[name]()
        if "tree_knn" in cfg.criteria:
            out[f"{PREFIX}/tree_knn"] = 0.0
            if h is not None:
                train, seen = inputs.features("train")
                seen = seen & (np.arange(seen.size) < h.assignments[0].shape[0])
                feats, rows = _subset(train, seen, cfg.max_samples, inputs.seed)
                if rows.size > cfg.knn_k:
                    out[f"{PREFIX}/tree_knn"] = tree_knn_agreement(
                        feats, [a.cpu().numpy()[rows] for a in h.assignments], cfg.knn_k)
        return out
