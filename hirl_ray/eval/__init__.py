"""Evaluation on frozen features: extraction, weighted kNN, clustering metrics, report.

Pure PyTorch / numpy / faiss / scikit-learn; nothing here imports ``ray``.
"""

from hirl_ray.eval.clustering import (
    cluster_accuracy,
    clustering_scores,
    hierarchy_consistency,
    kmeans_labels,
)
from hirl_ray.eval.features import dedup_by_index, eval_mode, extract_features
from hirl_ray.eval.knn import knn_accuracy, knn_predict
from hirl_ray.eval.report import evaluate

__all__ = [
    "cluster_accuracy",
    "clustering_scores",
    "dedup_by_index",
    "eval_mode",
    "evaluate",
    "extract_features",
    "hierarchy_consistency",
    "kmeans_labels",
    "knn_accuracy",
    "knn_predict",
]
