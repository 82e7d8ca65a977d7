"""HIRL prototype hierarchy: hierarchical k-means and snapshots.

Pure PyTorch/faiss; no Ray here. The Ray actor that rebuilds the hierarchy lives in
``hirl_ray.hierarchy.actor`` and is deliberately not imported by this package. The semantic
path loss that scores embeddings against the hierarchy is in
:mod:`hirl_ray.losses.semantic_path` (losses depend on the hierarchy, not the other way round).
"""

from hirl_ray.hierarchy.kmeans import PrototypeHierarchy, fit_hierarchy
from hirl_ray.hierarchy.snapshot import latest_snapshot, load_hierarchy, save_hierarchy

__all__ = [
    "PrototypeHierarchy",
    "fit_hierarchy",
    "latest_snapshot",
    "load_hierarchy",
    "save_hierarchy",
]
