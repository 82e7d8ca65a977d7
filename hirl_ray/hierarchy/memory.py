"""Memory estimate of a hierarchy rebuild, checked before training starts.

DeepCluster/NCL users hit out-of-memory at large K only after hours of training
(deepcluster #38, NCL #22); we estimate up front and say so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def rebuild_bytes(num_samples: int, dim: int, num_clusters: Sequence[int]) -> int:
    """Peak host memory of one rebuild in the prototype actor, in bytes (an upper bound).

    Counts the fp16 shards as received, their float32 de-duplicated copy, faiss's
    working copy and per-point distances/labels, and every level's centroids, parent
    maps and per-sample assignments.
    """
    n, d = int(num_samples), int(dim)
    features = n * d * (2 + 4 + 4)  # fp16 shards + float32 matrix + faiss training copy
    per_point = n * (8 + 4) * 2  # labels and distances, at level 0 and chained levels
    levels = sum(k * d * 4 + k * 8 + n * 8 for k in num_clusters)
    return features + per_point + levels


def total_memory_bytes() -> int | None:
    """Physical memory of this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def rebuild_memory_warning(num_samples: int, dim: int, num_clusters: Sequence[int],
                           available: int | None = None) -> str | None:
    """A one-line warning when a rebuild would need over 80% of ``available`` memory."""
    available = total_memory_bytes() if available is None else available
    need = rebuild_bytes(num_samples, dim, num_clusters)
    if available is None or need <= 0.8 * available:
        return None
    return (f"hierarchy rebuild needs about {need / 2**30:.1f} GiB for {num_samples} samples × "
            f"{dim} dims (hirl.num_clusters={list(num_clusters)}) but this machine has "
            f"{available / 2**30:.1f} GiB; give the prototype actor a bigger node "
            "(hirl.actor_num_cpus/actor_num_gpus) or lower the cluster counts")
