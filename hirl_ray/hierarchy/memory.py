"""Memory of a hierarchy rebuild, checked against the node the prototype actor runs on.

DeepCluster/NCL users hit out-of-memory at large K only after hours of training
(deepcluster #38, NCL #22); we estimate up front and say so. The estimate follows the path of
:func:`hirl_ray.hierarchy.rebuild.build_from_shards`: one float32 ``(N, D)`` matrix, one fp16
shard in flight, per-sample labels and distances, and the centroids. At the paper's ImageNet
setting (N = 1,281,167; 128-d projection embedding; K = 30000/10000/1000; 8 ranks) that is
about 0.8 GiB (11.4 GiB for 2048-d backbone features); the earlier concatenate-and-copy path
needed ~14 bytes per element plus its shards, 35-40 GB at 2048-d.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hirl_ray.config import ConfigError

#: Warn above this share of the node's memory: Ray's object store (30% of a node by default),
#: the actor's own runtime (torch, faiss, CUDA) and other workers need the rest, and Ray's
#: memory monitor kills workers at 95% node usage.
WARN_FRACTION = 0.7

#: Bytes per sample besides its feature row, at the level-0 peak (faiss' per-point assignment
#: and distance buffers, the search's labels/similarities, squared distances, the PCL
#: concentration temporaries, the present mask).
_PER_POINT = 56
#: Per sample and level: the kept int64 assignments, and their copy at dataset positions.
_PER_POINT_LEVEL = 16


@dataclass(frozen=True)
class RebuildMemory:
    """Peak host memory of one rebuild, in bytes, by part (see :func:`rebuild_estimate`)."""

    matrix: int
    shard: int
    per_point: int
    centroids: int

    @property
    def total(self) -> int:
        return self.matrix + self.shard + self.per_point + self.centroids

    def describe(self) -> str:
        """``"0.8 GiB (float32 matrix 0.61 + shard 0.04 + per-sample 0.12 + centroids 0.06)"``."""
        parts = ("float32 matrix", "shard", "per-sample", "centroids")
        values = (self.matrix, self.shard, self.per_point, self.centroids)
        body = " + ".join(f"{p} {v / 2**30:.2f}" for p, v in zip(parts, values, strict=True))
        return f"{self.total / 2**30:.1f} GiB ({body})"


def rebuild_estimate(
    num_samples: int, dim: int, num_clusters: Sequence[int], *, num_shards: int = 1
) -> RebuildMemory:
    """Peak host memory of one rebuild in the prototype actor (an upper bound).

    Args:
        num_samples: Dataset size ``N``.
        dim: Feature dimension ``D`` the workers send.
        num_clusters: ``hirl.num_clusters``.
        num_shards: Ranks that send a shard (``train.num_workers``); one shard, ``ceil(N /
            num_shards)`` fp16 rows, is mapped from the object store at a time.

    faiss' own subsample (``K_0 x max_points_per_centroid`` points when fewer than ``N``) is not
    a copy here: :func:`~hirl_ray.hierarchy.kmeans.fit_hierarchy` moves the chosen rows to the
    front of the matrix in place, so it costs index arrays only, inside the per-sample term.
    """
    n, d, levels = int(num_samples), int(dim), len(num_clusters)
    shard_rows = math.ceil(n / max(1, int(num_shards)))
    return RebuildMemory(
        matrix=n * d * 4,
        shard=shard_rows * (d * 2 + 8),  # fp16 rows + int64 indices
        per_point=n * (_PER_POINT + _PER_POINT_LEVEL * levels),
        # centroids, their normalised copy and faiss' index copy; parents and concentrations
        centroids=sum(k * (3 * d * 4 + 8 + 4) for k in num_clusters),
    )


def rebuild_bytes(
    num_samples: int, dim: int, num_clusters: Sequence[int], *, num_shards: int = 1
) -> int:
    """Total of :func:`rebuild_estimate`, in bytes."""
    return rebuild_estimate(num_samples, dim, num_clusters, num_shards=num_shards).total


def node_memory_bytes() -> int | None:
    """Memory this process's node offers: physical RAM, or a smaller cgroup (container) limit."""
    try:
        total: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or int(text) < total):
            total = int(text)  # "max" or a huge v1 number means no limit
    return total


def check_rebuild_memory(need: RebuildMemory, available: int | None, node: str) -> str | None:
    """Compare a rebuild estimate with the memory of the node the prototype actor runs on.

    Args:
        need: The estimate.
        available: That node's memory in bytes (``None``: unknown, nothing to say).
        node: Which node, as the user would recognise it ("this machine (local Ray)", a host).

    Returns:
        A one-line warning when the rebuild needs over ``WARN_FRACTION`` of the node, else None.

    Raises:
        ConfigError: the estimate exceeds the node's memory: the first rebuild would be killed.
    """
    if available is None or need.total <= WARN_FRACTION * available:
        return None
    text = (
        f"a hierarchy rebuild needs about {need.describe()} but the prototype actor's node, "
        f"{node}, has {available / 2**30:.1f} GiB"
    )
    fix = (
        "give the prototype actor a node with more memory (hirl.actor_num_gpus/actor_num_cpus "
        "decide where it runs; clusters/aws.yaml: gpu_1x) or lower hirl.num_clusters"
    )
    if need.total > available:
        raise ConfigError(f"{text}; {fix}")
    return f"{text} (over {WARN_FRACTION:.0%}); {fix}"
