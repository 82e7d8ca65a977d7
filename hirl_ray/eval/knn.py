"""Weighted k-nearest-neighbour classification on frozen features.

The classifier of InstDisc (Wu et al., CVPR 2018, Sec. 3.4) as used by DINO
(``eval_knn.py``): cosine similarity on L2-normalised features, the ``k`` most similar
training samples vote for their label with weight ``exp(sim / T)``. The defaults ``k = 20``,
``T = 0.07`` are fixed and documented because a silently changed temperature default broke
reproduction elsewhere (lightly #1824); the ``knn`` protocol's :class:`KnnConfig` (keys
``eval.params.knn.k`` / ``.temperature``) has the same defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hirl_ray.config import check_positive
from hirl_ray.eval.protocol import EvalInputs, EvalProtocol, register_protocol


def _as_tensor(x: Tensor | np.ndarray, dtype: torch.dtype) -> Tensor:
    return torch.as_tensor(x).to(dtype)


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Predict labels by a similarity-weighted vote of the ``k`` nearest training samples.

    score(x, c) = sum over the k nearest neighbours n of x with label c of exp(cos(x, n) / T)
    (InstDisc Eq. 9 / DINO ``knn_classifier``); the prediction is argmax_c score(x, c).

    Args:
        train_features: ``(N_train, D)`` features (normalised here, so raw is fine).
        train_labels: ``(N_train,)`` non-negative integer labels.
        test_features: ``(N_test, D)`` features.
        k: Neighbours per query; capped at ``N_train``.
        temperature: ``T`` in the vote weight; smaller means closer neighbours dominate.
        num_classes: Number of classes; defaults to ``max(train_labels) + 1``.
        chunk_size: Test rows per similarity block, bounding memory at
            ``chunk_size * N_train`` floats.

    Returns:
        ``(N_test,)`` int64 predicted labels, on CPU.
    """
    train = F.normalize(_as_tensor(train_features, torch.float32).cpu(), dim=1)
    test = F.normalize(_as_tensor(test_features, torch.float32).cpu(), dim=1)
    labels = _as_tensor(train_labels, torch.int64).cpu().reshape(-1)
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(
            f"knn_predict: features must be 2-D with equal width, got train {tuple(train.shape)}"
            f" and test {tuple(test.shape)}"
        )
    if labels.numel() != train.shape[0] or train.shape[0] == 0:
        raise ValueError(
            f"knn_predict: need one label per training row and at least one row, got "
            f"{train.shape[0]} rows and {labels.numel()} labels"
        )
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"knn_predict: k, temperature and chunk_size must be positive, got k={k}, "
            f"temperature={temperature}, chunk_size={chunk_size}"
        )
    if int(labels.min()) < 0:
        raise ValueError("knn_predict: train_labels must be >= 0; drop unlabeled (-1) rows first")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, train.shape[0])
    preds = []
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start : start + chunk_size] @ train.T  # (B, N_train)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        scores = torch.zeros(sim.shape[0], num_classes)
        scores.scatter_add_(1, labels[top_idx], weights)
        preds.append(scores.argmax(dim=1))
    if not preds:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(preds)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in ``[0, 1]`` of :func:`knn_predict` on ``test_labels``."""
    y = _as_tensor(test_labels, torch.int64).cpu().reshape(-1)
    if y.numel() == 0:
        raise ValueError("knn_accuracy: the test set is empty")
    labels = _as_tensor(train_labels, torch.int64)
    num_classes = max(int(labels.max()), int(y.max())) + 1 if labels.numel() else None
    pred = knn_predict(train_features, labels, test_features, k, temperature, num_classes)
    if pred.numel() != y.numel():
        raise ValueError(
            f"knn_accuracy: {pred.numel()} test feature rows but {y.numel()} test labels"
        )
    return float((pred == y).double().mean())


@dataclass(frozen=True)
class KnnConfig:
    """``eval.params.knn``: neighbours ``k`` and vote temperature ``T`` (fixed defaults)."""

    k: int = 20
    temperature: float = 0.07

    def check(self, where: str) -> None:
        check_positive(self, where, "k", "temperature")


@register_protocol
class KnnProtocol(EvalProtocol):
    """``knn_acc/<level>``: weighted kNN from train to test features at every label level."""

    name = "knn"
    Config = KnnConfig
    level_metrics = ("knn_acc",)

    def run(self, inputs: EvalInputs) -> dict[str, float]:
        cfg = self.config
        return {f"knn_acc/{lv.name}": knn_accuracy(lv.train_x, lv.train_y, lv.test_x, lv.test_y,
                                                   k=cfg.k, temperature=cfg.temperature)
                for lv in inputs.levels()}
