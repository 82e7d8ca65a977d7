"""Weighted k-nearest-neighbour classification on frozen features.

The classifier of InstDisc (Wu et al., CVPR 2018, Sec. 3.4) as used by DINO
(``eval_knn.py``): cosine similarity on L2-normalised features, the ``k`` most similar
training samples vote for their label with weight ``exp(sim / T)``. The defaults ``k = 20``,
``T = 0.07`` are fixed and documented because a silently changed temperature default broke
reproduction elsewhere (lightly #1824); the ``knn`` protocol's :class:`KnnConfig` (keys
``eval.params.knn.k`` / ``.temperature``) has the same defaults.

Several ``k`` at once (``eval.params.knn.k: [20, 10, 200]``) share one similarity matrix and
one ``topk`` with the largest ``k`` (:func:`knn_predict_many`), as DINO's ``eval_knn.py``
does for its ``nb_knn`` list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hirl_ray.config import ConfigError, check_positive
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
    return knn_predict_many(train_features, train_labels, test_features, (k,), temperature,
                            num_classes, chunk_size)[0]


def knn_predict_many(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    ks: Sequence[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """:func:`knn_predict` for several ``k`` from one similarity matrix per test chunk.

    One ``topk`` with ``max(ks)`` neighbours, sorted by similarity; the vote for a smaller
    ``k`` reads its first ``k`` columns (DINO ``eval_knn.py`` with a ``nb_knn`` list).

    Args:
        ks: Neighbour counts, each capped at ``N_train``; the other arguments as in
            :func:`knn_predict`.

    Returns:
        ``(len(ks), N_test)`` int64 predicted labels, row ``i`` for ``ks[i]``, on CPU.
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
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"knn_predict: k, temperature and chunk_size must be positive, got k={ks}, "
            f"temperature={temperature}, chunk_size={chunk_size}"
        )
    if int(labels.min()) < 0:
        raise ValueError("knn_predict: train_labels must be >= 0; drop unlabeled (-1) rows first")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    ks = [min(k, train.shape[0]) for k in ks]
    preds: list[list[Tensor]] = [[] for _ in ks]
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start : start + chunk_size] @ train.T  # (B, N_train)
        top_sim, top_idx = sim.topk(max(ks), dim=1)  # sorted: the k nearest are columns [:k]
        weights = (top_sim / temperature).exp()
        top_labels = labels[top_idx]
        for i, k in enumerate(ks):
            scores = torch.zeros(sim.shape[0], num_classes)
            scores.scatter_add_(1, top_labels[:, :k], weights[:, :k])
            preds[i].append(scores.argmax(dim=1))
    if test.shape[0] == 0:
        return torch.empty(len(ks), 0, dtype=torch.int64)
    return torch.stack([torch.cat(p) for p in preds])


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in ``[0, 1]`` of :func:`knn_predict` on ``test_labels``."""
    return knn_accuracies(train_features, train_labels, test_features, test_labels, (k,),
                          temperature)[0]


def knn_accuracies(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Sequence[int],
    temperature: float = 0.07,
) -> list[float]:
    """Top-1 accuracy in ``[0, 1]`` for every ``k`` in ``ks`` (:func:`knn_predict_many`)."""
    y = _as_tensor(test_labels, torch.int64).cpu().reshape(-1)
    if y.numel() == 0:
        raise ValueError("knn_accuracy: the test set is empty")
    labels = _as_tensor(train_labels, torch.int64)
    num_classes = max(int(labels.max()), int(y.max())) + 1 if labels.numel() else None
    pred = knn_predict_many(train_features, labels, test_features, ks, temperature, num_classes)
    if pred.shape[1] != y.numel():
        raise ValueError(
            f"knn_accuracy: {pred.shape[1]} test feature rows but {y.numel()} test labels"
        )
    return [float((p == y).double().mean()) for p in pred]


@dataclass(frozen=True)
class KnnConfig:
    """``eval.params.knn``: neighbours ``k`` and vote temperature ``T`` (fixed defaults).

    ``k`` is one count or a list of distinct counts (``[20, 10, 200]``), all scored from one
    similarity matrix; see :meth:`KnnProtocol.level_metrics_for` for the keys.
    """

    k: int | tuple[int, ...] = 20
    temperature: float = 0.07

    @property
    def ks(self) -> tuple[int, ...]:
        """``k`` as a tuple; the first one is the one reported as ``knn_acc``."""
        return (self.k,) if isinstance(self.k, int) else tuple(self.k)

    def check(self, where: str) -> None:
        if isinstance(self.k, int):
            check_positive(self, where, "k")
        elif not self.k or min(self.k) < 1 or len(set(self.k)) != len(self.k):
            raise ConfigError(f"{where}.k must be a positive integer or a non-empty list of "
                              f"distinct positive integers, got {list(self.k)}")
        check_positive(self, where, "temperature")


@register_protocol
class KnnProtocol(EvalProtocol):
    """``knn_acc/<level>``: weighted kNN from train to test features at every label level.

    With a list ``eval.params.knn.k: [k1, k2, ...]``, ``knn_acc/<level>`` is the accuracy at
    ``k1`` (as with ``k: k1``), and every ``k`` in the list also gets its own key
    ``knn_acc_k<k>/<level>`` (``knn_acc_k10/superclass``), so tables keep one column per
    ``k`` and the ``<prefix>/<level>`` grammar. Those extra prefixes depend on the config and
    are therefore not in the class-level ``level_metrics`` (which ``level_metric_prefixes()``
    reads); :meth:`level_metrics_for` lists them for a given config.
    """

    name = "knn"
    Config = KnnConfig
    level_metrics = ("knn_acc",)

    @classmethod
    def level_metrics_for(cls, config: KnnConfig) -> tuple[str, ...]:
        """Per-level prefixes this protocol writes under ``config``, in order."""
        extra = () if isinstance(config.k, int) else tuple(f"knn_acc_k{k}" for k in config.ks)
        return (*cls.level_metrics, *extra)

    def run(self, inputs: EvalInputs) -> dict[str, float]:
        cfg = self.config
        metrics: dict[str, float] = {}
        for lv in inputs.levels():
            accs = knn_accuracies(lv.train_x, lv.train_y, lv.test_x, lv.test_y, cfg.ks,
                                  temperature=cfg.temperature)
            metrics[f"knn_acc/{lv.name}"] = accs[0]
            if not isinstance(cfg.k, int):
                metrics.update({f"knn_acc_k{k}/{lv.name}": acc
                                for k, acc in zip(cfg.ks, accs, strict=True)})
        return metrics
