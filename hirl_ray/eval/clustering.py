"""Clustering metrics: k-means on frozen features scored by NMI / ARI / accuracy / FM.

The ``clustering`` protocol runs spherical k-means on the test features at every label level
with ``k`` = number of classes at that level, as in the HIRL paper's clustering evaluation,
and, when the run has a prototype tree, scores the tree's own clusters at every learned level
against every label level (HIRL reports NMI, ARI and Fowlkes–Mallows per level).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from hirl_ray.config import check_positive
from hirl_ray.eval.protocol import EvalInputs, EvalProtocol, register_protocol

log = logging.getLogger(__name__)


def _np(x: object) -> np.ndarray:
    """Array view of a numpy array, list or (possibly CUDA) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()  # type: ignore[attr-defined]
    return np.asarray(x)


def _contingency(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """``(n_clusters, n_classes)`` counts of (predicted cluster, true class) pairs."""
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    table = np.zeros((p.max(initial=-1) + 1, t.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table


def _label_pair(y_true: np.ndarray, y_pred: np.ndarray, who: str) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays flat; equal, non-empty sizes or a ValueError naming ``who``."""
    y_true, y_pred = _np(y_true).reshape(-1), _np(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"{who}: need equal, non-empty label arrays, got {y_true.size} true "
                         f"and {y_pred.size} predicted")
    return y_true, y_pred


def cluster_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Best one-to-one matching accuracy between clusters and classes (DEC, Xie et al. 2016).

    The Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) picks the cluster →
    class map that maximises matched samples. When the number of clusters differs from the
    number of classes the map is still one-to-one: surplus clusters (or classes) are left
    unmatched and their samples count as wrong. Label values need not be contiguous.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    y_true, y_pred = _label_pair(y_true, y_pred, "cluster_accuracy")
    table = _contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / y_true.size)


def cluster_purity(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Purity: each cluster takes its majority class (many-to-one), fraction of samples right.

    Unlike :func:`cluster_accuracy` several clusters may map to one class, so it stays
    meaningful when there are more clusters than classes (and reaches 1.0 for singletons).
    """
    y_true, y_pred = _label_pair(y_true, y_pred, "cluster_purity")
    return float(_contingency(y_true, y_pred).max(axis=1).sum() / y_true.size)


def fowlkes_mallows(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fowlkes–Mallows index (Fowlkes & Mallows, JASA 1983): ``TP / sqrt((TP+FP)(TP+FN))``.

    Counted over pairs of samples: ``TP`` pairs share a class and a cluster, ``TP + FP``
    share a cluster, ``TP + FN`` share a class. From the contingency table ``n_ij``:
    ``TP = sum n_ij^2 - N``, ``TP+FP = sum_i a_i^2 - N``, ``TP+FN = sum_j b_j^2 - N``;
    the same value as ``sklearn.metrics.fowlkes_mallows_score``, in int64 pair counts and
    a float square root (no int overflow for large ``N``). ``0`` when no pair shares both.
    """
    y_true, y_pred = _label_pair(y_true, y_pred, "fowlkes_mallows")
    table = _contingency(y_true, y_pred)
    n = y_true.size
    tp = int((table**2).sum()) - n
    same_cluster = int((table.sum(axis=1) ** 2).sum()) - n
    same_class = int((table.sum(axis=0) ** 2).sum()) - n
    if tp == 0:
        return 0.0
    return float(np.sqrt(tp / same_cluster) * np.sqrt(tp / same_class))


def clustering_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """NMI and ARI (scikit-learn), Hungarian accuracy and Fowlkes–Mallows of a clustering.

    Returns:
        ``{"nmi": ..., "ari": ..., "acc": ..., "fm": ...}``.
    """
    y_true, y_pred = _np(y_true).reshape(-1), _np(y_pred).reshape(-1)
    return {
        "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
        "ari": float(adjusted_rand_score(y_true, y_pred)),
        "acc": cluster_accuracy(y_true, y_pred),
        "fm": fowlkes_mallows(y_true, y_pred),
    }


def learned_level_scores(assignments: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    """:func:`clustering_scores` of a learned level's clusters, with ``acc`` by cluster count.

    ``acc`` is the Hungarian (one-to-one) accuracy when the level has at most as many
    non-empty clusters as there are classes, and :func:`cluster_purity` (many-to-one)
    otherwise: with ``K`` clusters for ``C < K`` classes a one-to-one map leaves ``K - C``
    clusters unmatched and caps accuracy near ``C / K``, which would score the cluster
    count, not the clustering. (Purity of the same pairs is also in the ``consistency``
    protocol as ``hierarchy/purity/l<l>_vs_y<j>``.)
    """
    y_true, a = _np(y_true).reshape(-1), _np(assignments).reshape(-1)
    scores = clustering_scores(y_true, a)
    if np.unique(a).size > np.unique(y_true).size:
        scores["acc"] = cluster_purity(y_true, a)
    return scores


def _kmeans_plusplus(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; greedy variant as in
    scikit-learn) for unit-norm rows, where squared distance = 2 - 2 * cosine.

    Written here with matrix products because ``sklearn.cluster.kmeans_plusplus`` took
    ~10x longer than the faiss iterations it seeds on our CPUs.
    """
    rng = np.random.default_rng(seed)
    n, trials = x.shape[0], 2 + int(np.log(k))
    centres = np.empty((k, x.shape[1]), dtype=np.float32)
    first = int(rng.integers(n))
    centres[0] = x[first]
    closest = np.maximum(2.0 - 2.0 * (x @ x[first]), 0.0).astype(np.float64)
    for c in range(1, k):
        cumulative = np.cumsum(closest)
        if cumulative[-1] <= 0:  # every point sits on a centre already: pick uniformly
            cand = rng.integers(n, size=trials)
        else:  # D^2 sampling; the candidate that most lowers the potential wins
            cand = np.searchsorted(cumulative, rng.random(trials) * cumulative[-1])
            cand = np.minimum(cand, n - 1)
        dist = np.maximum(2.0 - 2.0 * (x[cand] @ x.T), 0.0)  # (trials, n)
        new_closest = np.minimum(closest[None, :], dist)
        best = int(new_closest.sum(axis=1).argmin())
        centres[c], closest = x[cand[best]], new_closest[best]
    return centres


def kmeans_labels(
    features: np.ndarray, k: int, seed: int = 0, niter: int = 20, *, nredo: int = 3
) -> np.ndarray:
    """Spherical k-means (faiss Lloyd iterations) on L2-normalised features.

    Initialisation is greedy k-means++ (:func:`_kmeans_plusplus`), not faiss's: faiss's
    uniform random init, and in our tests also its k-means++ option, often merge two
    well-separated true clusters into one, which would make the metric measure the seed
    rather than the features. ``nredo`` restarts (seeds ``seed, seed+1, ...``) keep the run
    with the highest total cosine similarity to its centroid.

    faiss would silently subsample to ``max_points_per_centroid * k`` points (faiss #789,
    #1679); evaluation sets are small, so every point is used. It raises obscurely when
    ``N < k`` (faiss #2513), so that is checked here first. Empty clusters / collapse
    (faiss #3818) are logged as a warning.

    Returns:
        ``(N,)`` int64 cluster labels in ``[0, k)``.
    """
    x = np.ascontiguousarray(_np(features), dtype=np.float32)
    if x.ndim != 2 or k < 1 or x.shape[0] < k or nredo < 1:
        raise ValueError(
            f"kmeans_labels: need a 2-D feature array with at least k={k} >= 1 rows and "
            f"nredo >= 1, got shape {x.shape}, nredo={nredo}; lower k or pass more samples"
        )
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n, d = x.shape
    best_score, labels = -np.inf, np.zeros(n, dtype=np.int64)
    for run in range(nredo):
        init = _kmeans_plusplus(x, k, seed + run)
        km = faiss.Kmeans(
            d,
            k,
            niter=niter,
            seed=seed + run,
            spherical=True,
            verbose=False,
            min_points_per_centroid=1,  # no "please provide more points" stderr noise
            max_points_per_centroid=-(-n // k),  # ceil(n / k): use all points, no subsampling
        )
        km.train(x, init_centroids=init)
        sim, assign = km.index.search(x, 1)  # spherical -> inner-product index
        if float(sim.sum()) > best_score:
            best_score, labels = float(sim.sum()), assign.reshape(-1).astype(np.int64)
    used = np.unique(labels).size
    if used < k:
        log.warning("kmeans_labels: only %d of %d clusters are non-empty (N=%d)", used, k, n)
    return labels


#: Per-level scores of a clustering, in key order (``<score>/<level>``).
SCORES = ("nmi", "ari", "acc", "fm")

#: Learned hierarchy levels whose ``proto_l<l>_<score>`` prefixes are declared in
#: ``ClusteringProtocol.level_metrics`` (``level_metric_prefixes()``, sweep metric checks).
#: Deeper trees are still scored; their keys are just not listed there.
DECLARED_LEARNED_LEVELS = 4


def learned_level_prefixes(num_levels: int) -> tuple[str, ...]:
    """``proto_l<l>_<score>`` for learned levels ``0 .. num_levels - 1``, scores as SCORES."""
    return tuple(f"proto_l{lvl}_{m}" for lvl in range(num_levels) for m in SCORES)


@dataclass(frozen=True)
class ClusteringConfig:
    """``eval.params.clustering``: Lloyd iterations and restarts of :func:`kmeans_labels`."""

    niter: int = 20
    nredo: int = 3

    def check(self, where: str) -> None:
        check_positive(self, where, "niter", "nredo")


@register_protocol
class ClusteringProtocol(EvalProtocol):
    """Clustering scores at every label level, of k-means and of the learned hierarchy.

    * ``nmi/<level>``, ``ari/<level>``, ``acc/<level>`` (Hungarian), ``fm/<level>``
      (Fowlkes–Mallows): spherical k-means on the test features with ``k`` = number of
      classes at the level (seeded with ``inputs.seed``).
    * When ``inputs.hierarchy`` is set, ``proto_l<l>_{nmi,ari,acc,fm}/<level>``: the
      prototype clusters of learned level ``l`` (``hierarchy.assignments[l]``, which index
      the train split) against the train labels at every label level; ``acc`` is Hungarian
      or purity by cluster count (:func:`learned_level_scores`). These need no features.
      Unlabelled samples (``-1``) are left out.
    """

    name = "clustering"
    Config = ClusteringConfig
    level_metrics = (*SCORES, *learned_level_prefixes(DECLARED_LEARNED_LEVELS))

    def run(self, inputs: EvalInputs) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for lv in inputs.levels():
            pred = kmeans_labels(lv.test_x.numpy(), k=np.unique(lv.test_y).size,
                                 seed=inputs.seed, niter=self.config.niter,
                                 nredo=self.config.nredo)
            for key, value in clustering_scores(lv.test_y, pred).items():
                metrics[f"{key}/{lv.name}"] = value
        metrics.update(self.learned_levels(inputs))
        return metrics

    @staticmethod
    def learned_levels(inputs: EvalInputs) -> dict[str, float]:
        """``proto_l<l>_<score>/<level>`` of ``inputs.hierarchy``; ``{}`` without one."""
        h, labels = inputs.hierarchy, inputs.train_labels
        if h is None or inputs.num_levels == 0:
            return {}
        metrics: dict[str, float] = {}
        for lvl, assignment in enumerate(h.assignments):
            a = _np(assignment).reshape(-1).astype(np.int64)
            if a.size != labels.shape[0]:
                raise ValueError(
                    f"clustering: hierarchy.assignments[{lvl}] has {a.size} entries but the "
                    f"train split has {labels.shape[0]} samples; pass the hierarchy fitted on "
                    "this train split")
            for j, name in enumerate(inputs.level_names):
                keep = (labels[:, j] >= 0) & (a >= 0)
                if not keep.any():
                    continue
                for key, value in learned_level_scores(a[keep], labels[keep, j]).items():
                    metrics[f"proto_l{lvl}_{key}/{name}"] = value
        return metrics
