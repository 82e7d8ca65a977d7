"""Build the prototype hierarchy from feature shards, holding one float32 ``(N, D)`` matrix.

At ImageNet scale (HIRL Sec. 4: 1,281,167 images) the rebuild input is large: 0.66 GB as
float32 with the 128-d projection embedding, 10.5 GB with 2048-d ResNet-50 features. The
earlier path concatenated every fp16 shard, converted to float32, de-duplicated into another
matrix, converted again and normalised into a fourth: about 14 bytes per element, 35-40 GB at
2048-d. Here shards are consumed one at a time and scattered straight into one preallocated
float32 buffer at their dataset positions; that buffer is compacted, normalised and handed to
faiss in place (:func:`fit_hierarchy` with ``overwrite_features=True``), so the peak stays
near one matrix plus a shard (:mod:`hirl_ray.hierarchy.memory` estimates it).

Pure numpy/faiss, no Ray: the actor passes a generator that fetches one shard at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from hirl_ray.hierarchy.kmeans import PrototypeHierarchy, _row_chunks, fit_hierarchy

log = logging.getLogger(__name__)


def scatter_shards(
    shards: Iterable[tuple[np.ndarray, np.ndarray]], num_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scatter ``(indices, features)`` shards into one float32 matrix in dataset order.

    ``DistributedSampler`` pads the last shard by repeating indices; as
    :func:`hirl_ray.eval.features.dedup_by_index`, the first occurrence of each index wins
    (shard order, then row order), instead of the official HIRL halving of rows with norm > 1.5.

    Args:
        shards: ``(indices (m,) int, features (m, D) float16/float32)`` pairs, consumed one at a
            time (read-only Ray object-store views are fine: rows are copied out chunk by chunk).
        num_samples: Dataset size ``N``; every index lies in ``[0, N)``.

    Returns:
        ``(matrix, present)``: ``matrix`` is ``(N, D)`` float32 with row ``i`` the feature of
        sample ``i`` (uninitialised where ``present[i]`` is False); ``present`` is ``(N,)`` bool.

    Raises:
        ValueError: no shards, mismatched rows/indices/dimensions, or an index out of range.
    """
    present = np.zeros(num_samples, dtype=bool)
    matrix: np.ndarray | None = None
    for number, (indices, features) in enumerate(shards):
        idx = np.asarray(indices).reshape(-1).astype(np.int64, copy=False)
        feats = np.asarray(features)
        if feats.ndim != 2 or feats.shape[0] != idx.shape[0]:
            raise ValueError(
                f"shard {number}: features of shape {feats.shape} do not match "
                f"{idx.shape[0]} indices; send one (D,) feature row per dataset index"
            )
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= num_samples):
            raise ValueError(
                f"shard {number}: indices must lie in [0, {num_samples}), got range "
                f"[{int(idx.min())}, {int(idx.max())}]; pass the full dataset size"
            )
        if matrix is None:
            # np.empty: pages are committed as rows are written, and absent rows never are.
            matrix = np.empty((num_samples, feats.shape[1]), dtype=np.float32)
        elif feats.shape[1] != matrix.shape[1]:
            raise ValueError(
                f"shard {number}: {feats.shape[1]}-d features after {matrix.shape[1]}-d ones; "
                "every rank must send the same embedding"
            )
        # Chunks bound the temporaries (a fancy-indexed fp16 slice) whatever the shard size.
        for rows in _row_chunks(idx.shape[0], feats.shape[1]):
            chunk = idx[rows]
            new = np.flatnonzero(~present[chunk])
            if new.size == 0:
                continue
            targets, first = np.unique(chunk[new], return_index=True)  # first within chunk
            matrix[targets] = feats[rows.start + new[first]]
            present[targets] = True
        del indices, features, idx, feats  # let the shard's object-store buffer go
    if matrix is None:
        raise ValueError("scatter_shards: got no shards; every rank must submit its features")
    return matrix, present


def compact_present(matrix: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Move the present rows to the front of ``matrix``, in order, in place; return that view.

    Present row ``p_j`` moves to ``j <= p_j``: every source lies at or after every destination
    written before it, so chunked forward copying never reads an overwritten row.
    """
    positions = np.flatnonzero(present)
    if positions.size == matrix.shape[0]:
        return matrix
    for rows in _row_chunks(positions.size, matrix.shape[1]):
        matrix[rows] = matrix[positions[rows]]
    return matrix[: positions.size]


def expand_assignments(h: PrototypeHierarchy, present: np.ndarray) -> PrototypeHierarchy:
    """Put the assignments of present samples back at their dataset positions.

    Samples without features are marked -1 (the path loss never sees them: only indices of
    trained samples reach it, and every trained sample had features).
    """
    mask = torch.from_numpy(np.asarray(present, dtype=bool))
    full = []
    for a in h.assignments:
        out = torch.full((mask.shape[0],), -1, dtype=torch.long)
        out[mask] = a
        full.append(out)
    return PrototypeHierarchy(
        version=h.version,
        centroids=h.centroids,
        parents=h.parents,
        assignments=tuple(full),
        densities=h.densities,
    )


def build_from_shards(
    shards: Iterable[tuple[np.ndarray, np.ndarray]],
    num_samples: int,
    num_clusters: Sequence[int],
    *,
    seed: int = 0,
    niter: int = 20,
    nredo: int = 5,
    max_points_per_centroid: int = 1000,
    use_gpu: bool | None = None,
    version: int = 0,
    init: str = "random",
    timings: dict[str, float] | None = None,
) -> PrototypeHierarchy:
    """Hierarchical k-means (HIRL Sec. 3.1) over de-duplicated shards, one matrix in memory.

    Same result as :func:`fit_hierarchy` on the de-duplicated present rows (same seeds), with
    assignments at dataset positions and -1 for samples no shard had.

    Args:
        shards: ``(indices, features)`` pairs, consumed one at a time (see
            :func:`scatter_shards`); the caller should not hold on to earlier ones.
        num_samples: Dataset size ``N``.
        num_clusters, seed, niter, nredo, max_points_per_centroid, use_gpu, version, init: As
            :func:`fit_hierarchy`.
        timings: If given, receives seconds spent gathering the shards (``gather``: fetching
            and scattering them) and clustering each level (``level0``, …).

    Returns:
        The hierarchy, with ``(N,)`` assignments per level.
    """
    started = time.perf_counter()
    matrix, present = scatter_shards(shards, num_samples)
    if timings is not None:
        timings["gather"] = time.perf_counter() - started
    count = int(present.sum())
    if count < num_samples:
        log.warning(
            "hierarchy v%d: %d of %d samples had no features; clustering the other %d",
            version,
            num_samples - count,
            num_samples,
            count,
        )
    points = compact_present(matrix, present)
    del matrix  # points is a view of it (or it): the only float32 matrix
    h = fit_hierarchy(
        points,
        num_clusters,
        seed=seed,
        niter=niter,
        nredo=nredo,
        max_points_per_centroid=max_points_per_centroid,
        use_gpu=use_gpu,
        version=version,
        init=init,
        overwrite_features=True,
        timings=timings,
    )
    return expand_assignments(h, present) if count < num_samples else h
