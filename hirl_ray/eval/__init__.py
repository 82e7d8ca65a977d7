"""Evaluation on frozen features: extraction, the protocols (one file each), the runner.

Built-in protocols, registered on import: ``knn`` (:mod:`~hirl_ray.eval.knn`), ``clustering``
(:mod:`~hirl_ray.eval.clustering`), ``consistency`` (:mod:`~hirl_ray.eval.consistency`),
``label_free`` (:mod:`~hirl_ray.eval.label_free`), ``linear``, ``finetune``, ``semisup``. A new
protocol is one file here: see :mod:`hirl_ray.eval.protocol`.

Pure PyTorch / numpy / faiss / scikit-learn; nothing here imports ``ray``. Importing the
package imports every module in it, so a protocol file registers itself without an edit here.
"""

import importlib
import pkgutil

# knn first: registration order is the order of level_metric_prefixes() (knn_acc, nmi, ...).
from hirl_ray.eval import knn as _knn  # noqa: F401
from hirl_ray.eval.clustering import cluster_accuracy, clustering_scores, kmeans_labels
from hirl_ray.eval.consistency import hierarchy_consistency
from hirl_ray.eval.features import dedup_by_index, eval_mode, extract_features
from hirl_ray.eval.knn import knn_accuracy, knn_predict
from hirl_ray.eval.protocol import (
    EvalInputs,
    EvalProtocol,
    level_metric_prefixes,
    metric_prefixes,
    register_protocol,
    run_protocols,
)
from hirl_ray.eval.report import evaluate, run_evaluation


def _import_every_module() -> None:
    """Import each module of this package, so a new file here registers itself (no edit here)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_every_module()


__all__ = [
    "EvalInputs",
    "EvalProtocol",
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
    "level_metric_prefixes",
    "metric_prefixes",
    "register_protocol",
    "run_evaluation",
    "run_protocols",
]
