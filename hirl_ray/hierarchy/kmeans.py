"""Hierarchical k-means prototypes (HIRL, Xu et al. 2022, Sec. 3.1).

Level 0 clusters the L2-normalised sample features; level ``l`` clusters the normalised
centroids of level ``l - 1``. This follows the official HIRL ``run_hkmeans`` (itself PCL's
``run_kmeans``): ``faiss.Clustering`` with an L2 flat index on normalised inputs, ``seed + level``
per level, faiss' default (random) seeding (``init="random"``, ``hirl.kmeans_init``), and the
PCL concentration estimate per cluster. One option and two deliberate differences:

* ``init="kmeans++"`` seeds Lloyd with k-means++: on planted 4/12/48 trees random seeding left
  NMI at 0.93-0.95 on levels 0-1 (0.70 at the top on less separated trees), k-means++ >= 0.97.
  Exact k-means++ above level 0 (only K_{l-1} points); level 0 uses the MCMC approximation
  AFK-MC2 (Bachem et al. 2016). faiss runs both single-threaded on the CPU, even with faiss-gpu,
  in O(m K^2 D): fine at the built-in K = 48, hours per restart at the paper's K = 30000,
  D = 2048. Hence random, the official seeding, is the default;
* assignments (samples → level-0 clusters, centroids → parents) are the nearest *normalised*
  centroid, i.e. the highest cosine, which is exactly the similarity the path loss (Eq. 4)
  uses; the official code assigns to the un-normalised k-means centroid;
* faiss' silent subsampling (faiss #789, #1679) and empty/collapsed clusters (faiss #3818) are
  logged instead of passing unnoticed, and bad inputs fail before any clustering starts. The
  subsample is drawn in place (``_training_subset``) rather than copied by faiss, and with
  ``overwrite_features`` the input is normalised in place: one ``(N, D)`` matrix at ImageNet scale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from hirl_ray.config import ConfigError

logger = logging.getLogger(__name__)

#: PCL rescales concentrations so their mean equals this temperature (PCL ``args.temperature``).
DENSITY_TEMPERATURE = 0.2


@dataclass(frozen=True)
class PrototypeHierarchy:
    """Prototype tree from hierarchical k-means (HIRL, Sec. 3.1).

    Attributes:
        version: Monotone rebuild counter; workers use it to notice a new hierarchy.
        centroids: ``centroids[l]`` is ``(K_l, D)`` float32, rows L2-normalised.
        parents: ``parents[l]`` is ``(K_l,)`` int64 index into level ``l + 1`` (``L - 1`` entries).
        assignments: ``assignments[l]`` is ``(N,)`` int64, the level-``l`` cluster of every
            training sample; chained, ``assignments[l + 1] == parents[l][assignments[l]]``.
        densities: ``densities[l]`` is ``(K_l,)`` float32 PCL concentration per cluster.
    """

    version: int
    centroids: tuple[torch.Tensor, ...]
    parents: tuple[torch.Tensor, ...]
    assignments: tuple[torch.Tensor, ...]
    densities: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        # Cheap structural checks (no per-element work): a truncated snapshot or a hand-built
        # tree with mismatched levels fails here, not deep inside the loss.
        for name in ("centroids", "parents", "assignments", "densities"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        ks = [c.shape[0] if c.ndim == 2 else -1 for c in self.centroids]
        ok = (
            len(ks) > 0
            and len(self.parents) == len(ks) - 1
            and len(self.assignments) == len(self.densities) == len(ks)
            and all(d.shape == (k,) for d, k in zip(self.densities, ks, strict=True))
            and all(p.shape == (k,) for p, k in zip(self.parents, ks, strict=False))
        )
        if not ok:
            raise ValueError(
                "PrototypeHierarchy: levels disagree: centroids "
                f"{[tuple(c.shape) for c in self.centroids]}, parents "
                f"{[tuple(p.shape) for p in self.parents]}, densities "
                f"{[tuple(d.shape) for d in self.densities]}, "
                f"{len(self.assignments)} assignment vectors"
            )

    @property
    def num_levels(self) -> int:
        """Number of levels ``L`` (level 0 is the finest)."""
        return len(self.centroids)

    @property
    def num_clusters(self) -> tuple[int, ...]:
        """``(K_0, ..., K_{L-1})``."""
        return tuple(int(c.shape[0]) for c in self.centroids)

    @property
    def dim(self) -> int:
        """Feature dimension ``D`` of every centroid."""
        return int(self.centroids[0].shape[1])

    @property
    def num_samples(self) -> int:
        """Number of training samples ``N`` the assignments cover."""
        return int(self.assignments[0].shape[0])

    def ancestors(self) -> tuple[torch.Tensor, ...]:
        """Level-``l`` cluster of every level-0 cluster: ``ancestors[l]`` is ``(K_0,)``.

        ``ancestors[0]`` is ``arange(K_0)``; a level-0 cluster id thus determines a whole path.
        """
        current = torch.arange(
            self.num_clusters[0],
            device=self.parents[0].device if self.parents else self.centroids[0].device,
        )
        out = [current]
        for parent in self.parents:
            current = parent[current]
            out.append(current)
        return tuple(out)

    def to(self, device: torch.device | str) -> PrototypeHierarchy:
        """A copy with every tensor on ``device`` (e.g. once per rebuild on a worker's GPU)."""

        def move(ts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return tuple(t.to(device) for t in ts)

        return dataclasses.replace(
            self,
            centroids=move(self.centroids),
            parents=move(self.parents),
            assignments=move(self.assignments),
            densities=move(self.densities),
        )

    def with_version(self, version: int) -> PrototypeHierarchy:
        """The same tree under another version number."""
        return dataclasses.replace(self, version=int(version))


def _validate_num_clusters(num_clusters: Sequence[int], num_samples: int | None) -> tuple[int, ...]:
    ks = tuple(num_clusters)
    if not ks:
        raise ConfigError(
            "hirl.num_clusters is empty; give one cluster count per level, "
            "finest first, e.g. [48, 12, 4]"
        )
    for level, k in enumerate(ks):
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ConfigError(f"hirl.num_clusters[{level}] must be a positive integer, got {k!r}")
    for level in range(1, len(ks)):
        if ks[level] >= ks[level - 1]:
            raise ConfigError(
                f"hirl.num_clusters must strictly decrease per level, got {list(ks)} "
                f"(level {level} >= level {level - 1}); order them finest first"
            )
    if num_samples is not None:
        points = (num_samples, *ks[:-1])  # level l clusters the K_{l-1} centroids below it
        for level, (k, n) in enumerate(zip(ks, points, strict=True)):
            if k > n:
                what = "training samples" if level == 0 else f"level-{level - 1} centroids"
                raise ConfigError(
                    f"hirl.num_clusters[{level}]={k} asks for more clusters than the "
                    f"{n} {what} at level {level}; lower it to at most {n}"
                )
    return tuple(int(k) for k in ks)


#: Rows per step of the chunked passes below: ~1 MiB of float32 at any D, so the temporaries of
#: checking, converting and normalising stay small next to the ``(N, D)`` matrix itself.
_CHUNK_ELEMENTS = 1 << 18


def _row_chunks(n: int, dim: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(dim, 1))
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def _as_float32_matrix(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """``features`` as a 2-D numpy array, without copying (torch tensors share memory on CPU).

    The dtype is left alone: float16 shards are converted chunk by chunk while normalising,
    so no full-size float32 temporary is made next to the normalised matrix.
    """
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ConfigError(
            f"fit_hierarchy features must be a non-empty 2-D (N, D) array, got shape "
            f"{x.shape}; pass one feature row per training sample"
        )
    return x


def _count_non_finite_rows(x: np.ndarray) -> int:
    # Chunked: np.isfinite(x) at once would allocate N x D bytes (a quarter of the matrix).
    return sum(int((~np.isfinite(x[rows]).all(axis=1)).sum()) for rows in _row_chunks(*x.shape))


def _l2_normalise(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm, written into ``out`` (may be ``x``: in place).

    Works chunk by chunk, so the only full-size allocation is ``out`` when it is not given.
    """
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    for rows in _row_chunks(*x.shape):
        # Shards may arrive as fp16 (half the object-store traffic; precise enough as k-means
        # input), but faiss clusters in float32.
        chunk = np.asarray(x[rows], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
        np.divide(chunk, np.maximum(norms, 1e-12)[:, None], out=out[rows])
    return out


def _is_own_buffer(x: np.ndarray) -> bool:
    """Whether ``x`` can serve as faiss's input as is: float32, C-contiguous, writable."""
    return x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable


@contextlib.contextmanager
def _training_subset(points: np.ndarray, limit: int, seed: int) -> Iterator[np.ndarray]:
    """A uniform random ``limit`` rows of ``points`` as its first rows, without a copy.

    faiss subsamples ``n > limit`` training points into a fresh array (``limit x D`` floats, up
    to nearly the whole matrix when ``K_0 x max_points_per_centroid`` is just below ``N``).
    Instead we swap the chosen rows that lie beyond ``limit`` with the unchosen rows before it
    (disjoint pairs, chunk by chunk), train on the contiguous prefix, and swap back: the same
    swaps undo themselves, so every row is where it was for the assignment search.
    """
    n = points.shape[0]
    if n <= limit:
        yield points
        return
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).choice(n, size=limit, replace=False)] = True
    front = np.flatnonzero(~chosen[:limit])  # unchosen rows in the prefix
    back = limit + np.flatnonzero(chosen[limit:])  # chosen rows beyond it (same count)
    del chosen

    def swap() -> None:
        for part in _row_chunks(len(front), points.shape[1]):
            a, b = front[part], back[part]
            tmp = points[a]
            points[a] = points[b]
            points[b] = tmp

    swap()
    try:
        yield points[:limit]
    finally:
        swap()


def _resolve_gpu(use_gpu: bool | None) -> bool:
    available = bool(
        hasattr(faiss, "get_num_gpus")
        and faiss.get_num_gpus() > 0
        and hasattr(faiss, "StandardGpuResources")
    )
    if use_gpu and not available:
        # faiss-gpu wheels are often missing or stale (faiss-wheels #83, #151): degrade, say so.
        logger.warning(
            "fit_hierarchy: use_gpu=True but this faiss build has no GPU support; "
            "clustering on CPU (install faiss-gpu for GPU k-means)"
        )
    return available if use_gpu is None else bool(use_gpu) and available


def _flat_index(dim: int, metric: int, gpu_res: Any) -> Any:
    if gpu_res is None:
        return faiss.IndexFlat(dim, metric)
    cfg = faiss.GpuIndexFlatConfig()
    cfg.useFloat16 = False  # as PCL/HIRL: fp16 distances perturb assignments
    cfg.device = 0  # the GPU Ray (CUDA_VISIBLE_DEVICES) gave this process
    if metric == faiss.METRIC_L2:
        return faiss.GpuIndexFlatL2(gpu_res, dim, cfg)
    return faiss.GpuIndexFlatIP(gpu_res, dim, cfg)


def cluster_concentration(
    sq_dist: np.ndarray, labels: np.ndarray, k: int, temperature: float = DENSITY_TEMPERATURE
) -> np.ndarray:
    """PCL concentration ``phi`` per cluster (PCL, Li et al. 2021), vectorised.

    ``phi_c = mean(||v - c||) / log(n_c + 10)`` over the ``n_c > 1`` members of cluster ``c``;
    clusters with ``n_c <= 1`` take the largest ``phi``; then clip to the 10th/90th percentile and
    rescale so the mean is ``temperature``. Same numbers as PCL's per-cluster Python loop, except
    that a ``phi`` of 0 (every member on its centroid) becomes the smallest positive one.

    Args:
        sq_dist: ``(n,)`` squared L2 distance of every member to its centroid.
        labels: ``(n,)`` cluster of every member.
        k: Number of clusters.
        temperature: Target mean of the result.

    Returns:
        ``(k,)`` float32 concentrations.
    """
    counts = np.bincount(labels, minlength=k)
    dist_sum = np.bincount(labels, weights=np.sqrt(np.maximum(sq_dist, 0.0)), minlength=k)
    multi = counts > 1
    density = np.zeros(k, dtype=np.float64)
    density[multi] = dist_sum[multi] / counts[multi] / np.log(counts[multi] + 10)
    density[~multi] = density.max()
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    positive = density > 0
    if positive.any():
        # Members all on their centroid (duplicate points) would give phi = 0, an infinite
        # inverse temperature: such a cluster takes the tightest positive phi instead.
        density[~positive] = density[positive].min()
    mean = density.mean()
    if not np.isfinite(mean) or mean <= 0:
        # All members sit on their centroids (duplicates): PCL would divide by zero here.
        return np.full(k, temperature, dtype=np.float32)
    return (temperature * density / mean).astype(np.float32)


def _kmeans_level(
    points: np.ndarray,
    k: int,
    *,
    level: int,
    seed: int,
    niter: int,
    nredo: int,
    max_points_per_centroid: int,
    init: str,
    gpu_res: Any,
    verbose: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One faiss k-means; returns (normalised centroids, labels, squared distances)."""
    n, dim = points.shape
    if n > k * max_points_per_centroid:
        logger.warning(
            "hierarchy level %d: faiss trains on a random %d of %d points "
            "(max_points_per_centroid=%d x %d clusters); every point is still assigned",
            level,
            k * max_points_per_centroid,
            n,
            max_points_per_centroid,
            k,
        )
    clus = faiss.Clustering(dim, k)
    clus.verbose, clus.niter, clus.nredo, clus.seed = verbose, niter, nredo, seed + level
    clus.max_points_per_centroid = max_points_per_centroid
    # PCL uses 10, which only makes faiss print a warning on small upper levels.
    clus.min_points_per_centroid = 1
    # k-means++ seeding (see module docstring); stale faiss-gpu wheels (faiss-wheels #83) lack it.
    method = getattr(
        faiss, "ClusteringInitMethod_" + ("KMEANS_PLUS_PLUS" if level else "AFK_MC2"), None
    )
    if init == "kmeans++" and method is not None and hasattr(clus, "init_method"):
        clus.init_method = method
    elif init == "kmeans++":
        logger.warning("hierarchy level %d: this faiss has no k-means++ init; using random", level)
    # Our own subsample, in place (see _training_subset); faiss then trains on all it gets.
    with _training_subset(points, k * max_points_per_centroid, seed + level) as sample:
        clus.train(sample, _flat_index(dim, faiss.METRIC_L2, gpu_res))
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, dim)
    broken = ~np.isfinite(centroids).all(axis=1)
    if broken.any():
        # Never hand NaN prototypes to the loss: such a row attracts nothing below and is
        # re-seeded like an empty cluster.
        logger.warning("hierarchy level %d: %d non-finite centroids from faiss; re-seeding them",
                       level, int(broken.sum()))
        centroids[broken] = 0.0
    centroids = _l2_normalise(centroids)
    labels, sq_dist = _assign(points, centroids, gpu_res)
    return _reseed_empty(points, centroids, labels, sq_dist, level, gpu_res)


def _assign(points: np.ndarray, centroids: np.ndarray, gpu_res: Any
            ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest normalised centroid (highest cosine) of every point and its squared distance."""
    index = _flat_index(points.shape[1], faiss.METRIC_INNER_PRODUCT, gpu_res)
    index.add(centroids)
    sim, labels = index.search(points, 1)
    # ||x - c||^2 with unit-norm c; kept exact for (rare) all-zero feature rows.
    sq_dist = np.einsum("ij,ij->i", points, points) - 2.0 * sim[:, 0] + 1.0
    return labels[:, 0].astype(np.int64), sq_dist


#: A point this close (squared L2) to its centroid sits on it: no new cluster can start there.
_ON_CENTROID = 1e-6
#: Re-seeding rounds per level (each is one assignment pass over the points).
_RESEED_ROUNDS = 5


def _reseed_empty(points: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
                  sq_dist: np.ndarray, level: int, gpu_res: Any
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give empty clusters a member: re-seed each at the farthest point of a populous cluster.

    faiss can end with empty clusters or collapse to one (faiss #3818), most often when the
    features hold fewer distinct points than clusters (a collapsed encoder). Per round, every
    cluster with at least two members offers its point farthest from its centroid (one that
    does not sit on it); the farthest offers become the empty clusters' centroids, then every
    point is assigned again. Clusters that stay empty (no distinct point left) are kept, with a
    warning from the caller: their centroids are finite unit vectors that no sample uses.
    """
    k = centroids.shape[0]
    reseeded = 0
    for _ in range(_RESEED_ROUNDS):
        counts = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if not empty.size:
            break
        order = np.argsort(-sq_dist, kind="stable")
        clusters, first = np.unique(labels[order], return_index=True)
        far = order[first]  # the farthest member of every non-empty cluster
        # An all-zero row has cosine 0 to every centroid: no cluster can be built on it.
        nonzero = np.einsum("ij,ij->i", points[far], points[far]) > 0.5
        offers = far[(counts[clusters] >= 2) & (sq_dist[far] > _ON_CENTROID) & nonzero]
        if not offers.size:
            break
        offers = offers[np.argsort(-sq_dist[offers], kind="stable")][:empty.size]
        centroids[empty[:offers.size]] = _l2_normalise(points[offers])
        reseeded += offers.size
        labels, sq_dist = _assign(points, centroids, gpu_res)
    if reseeded:
        logger.warning("hierarchy level %d: %d re-seeds of empty clusters at the farthest "
                       "points of populous clusters (faiss #3818)", level, reseeded)
    return centroids, labels, sq_dist


def _warn_empty(level: int, labels: np.ndarray, k: int, what: str) -> None:
    counts = np.bincount(labels, minlength=k)
    empty = int((counts == 0).sum())
    if empty:
        # Left after re-seeding (_reseed_empty): the points hold no further distinct point.
        # Training still works, but the tree has dead branches, so make it visible.
        collapsed = "; all collapsed into one cluster" if empty == k - 1 else ""
        logger.warning(
            "hierarchy level %d: %d of %d clusters have no %s (largest: %d of %d)%s; the "
            "inputs hold only about %d distinct points (a collapsed encoder?)",
            level,
            empty,
            k,
            what,
            int(counts.max()),
            len(labels),
            collapsed,
            k - empty,
        )


def fit_hierarchy(
    features: np.ndarray | torch.Tensor,
    num_clusters: Sequence[int],
    *,
    seed: int = 0,
    niter: int = 20,
    nredo: int = 5,
    max_points_per_centroid: int = 1000,
    use_gpu: bool | None = None,
    version: int = 0,
    verbose: bool = False,
    init: str = "random",
    overwrite_features: bool = False,
    timings: dict[str, float] | None = None,
) -> PrototypeHierarchy:
    """Build the prototype tree by hierarchical k-means (HIRL Sec. 3.1, official ``run_hkmeans``).

    Args:
        features: ``(N, D)`` sample features (float32 or float16; numpy or torch, any device).
        num_clusters: ``hirl.num_clusters``, finest level first, strictly decreasing.
        seed: Level ``l`` uses faiss seed ``seed + l``; CPU results are deterministic per seed.
        niter: k-means iterations per run.
        nredo: k-means restarts per level; the lowest-objective run is kept.
        max_points_per_centroid: faiss trains on at most this many points per cluster (logged).
        use_gpu: ``None`` = GPU when faiss has one; ``True`` falls back to CPU with a log line.
        init: ``"random"`` (faiss' default, official HIRL) or ``"kmeans++"`` (AFK-MC2 at
            level 0, exact above; single-threaded CPU, see the module docstring).
        version: Version stamped on the result.
        verbose: Let faiss print its per-iteration progress.
        overwrite_features: ``features`` is a scratch buffer: when it is a float32, C-contiguous,
            writable numpy array its rows are L2-normalised in place and faiss works on it
            directly, so the rebuild holds one ``(N, D)`` matrix instead of two
            (:func:`~hirl_ray.hierarchy.rebuild.build_from_shards` passes its own buffer).
            Otherwise, and by default, ``features`` is left untouched and one float32 copy made.
        timings: If given, receives the seconds each level's k-means took (``level0``, …).

    Returns:
        The hierarchy with CPU tensors.

    Raises:
        ConfigError: (a ``ValueError``) bad ``num_clusters`` or features, before any clustering.
    """
    ks = _validate_num_clusters(num_clusters, None)  # list errors before touching features
    if init not in ("kmeans++", "random"):
        raise ValueError(f"fit_hierarchy init must be 'kmeans++' or 'random', got {init!r}")
    x = _as_float32_matrix(features)
    _validate_num_clusters(ks, x.shape[0])
    bad = _count_non_finite_rows(x)
    if bad:
        raise ConfigError(
            f"fit_hierarchy features have {bad} rows with NaN/Inf; fix the encoder "
            "(e.g. lower the lr or disable AMP) before rebuilding the hierarchy"
        )
    gpu_res = faiss.StandardGpuResources() if _resolve_gpu(use_gpu) else None
    started = time.perf_counter()
    # At ImageNet scale every (N, D) copy is gigabytes: normalise into the caller's scratch
    # buffer when allowed, else into exactly one float32 copy (also converts fp16 / torch).
    in_place = overwrite_features and _is_own_buffer(x)
    points = _l2_normalise(x, out=x if in_place else None)
    del x
    zero = sum(int((np.einsum("ij,ij->i", points[r], points[r]) < 0.5).sum())
               for r in _row_chunks(*points.shape))
    if zero:
        logger.warning("fit_hierarchy: %d of %d feature rows are all-zero (cosine 0 to every "
                       "prototype; a collapsed encoder?)", zero, points.shape[0])
    centroids, parents, assignments, densities = [], [], [], []
    for level, k in enumerate(ks):
        level_started = time.perf_counter()
        c, labels, sq_dist = _kmeans_level(
            points,
            k,
            level=level,
            seed=seed,
            niter=niter,
            nredo=nredo,
            max_points_per_centroid=max_points_per_centroid,
            init=init,
            gpu_res=gpu_res,
            verbose=verbose,
        )
        if level == 0:
            assignments.append(labels)
        else:
            parents.append(labels)
            assignments.append(labels[assignments[-1]])
        _warn_empty(level, labels, k, "samples" if level == 0 else f"level-{level - 1} children")
        # As PCL/HIRL: a level's concentration is measured on the points it clustered
        # (samples at level 0, child centroids above).
        densities.append(cluster_concentration(sq_dist, labels, k))
        centroids.append(c)
        points = c
        if timings is not None:
            timings[f"level{level}"] = time.perf_counter() - level_started
    logger.info(
        "hierarchy v%d: num_clusters=%s over %d samples in %.2fs on %s",
        version,
        list(ks),
        assignments[0].shape[0],
        time.perf_counter() - started,
        "GPU" if gpu_res is not None else "CPU",
    )
    return PrototypeHierarchy(
        version=int(version),
        centroids=tuple(torch.from_numpy(c) for c in centroids),
        parents=tuple(torch.from_numpy(p) for p in parents),
        assignments=tuple(torch.from_numpy(a) for a in assignments),
        densities=tuple(torch.from_numpy(d) for d in densities),
    )
