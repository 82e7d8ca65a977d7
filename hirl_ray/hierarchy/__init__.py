"""HIRL prototype hierarchy: hierarchical k-means, the semantic path loss, snapshots.

Pure PyTorch/faiss; no Ray here. The Ray actor that rebuilds the hierarchy lives in
``hirl_ray.hierarchy.actor`` and is deliberately not imported by this package.
"""

from hirl_ray.hierarchy.kmeans import PrototypeHierarchy, fit_hierarchy
from hirl_ray.hierarchy.loss import semantic_path_loss
from hirl_ray.hierarchy.snapshot import latest_snapshot, load_hierarchy, save_hierarchy

__all__ = [
    "PrototypeHierarchy",
    "fit_hierarchy",
    "latest_snapshot",
    "load_hierarchy",
    "save_hierarchy",
    "semantic_path_loss",
]
