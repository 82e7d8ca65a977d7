"""Frozen-feature evaluation at every label level (kNN accuracy and k-means NMI/ARI/ACC).

Pure PyTorch / numpy; the trainer calls :func:`evaluate` at the end of a fit. Clustering
runs on the test split with ``k`` = number of classes at the level, as in the HIRL paper's
clustering evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from hirl_ray.config import ConfigError
from hirl_ray.eval.clustering import clustering_scores, kmeans_labels
from hirl_ray.eval.features import dedup_by_index, eval_mode, extract_features
from hirl_ray.eval.knn import knn_accuracy


def _labels_2d(labels: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(labels)
    y = y.reshape(-1, 1) if y.ndim == 1 else y
    if y.ndim != 2:
        raise ConfigError(f"evaluate: {name} must be (N, L) integer labels, got shape {y.shape}")
    return y.astype(np.int64)


def _features(
    embed: Callable, loader: Iterable, n: int, device: torch.device | str, name: str
) -> tuple[torch.Tensor, np.ndarray]:
    """Features in dataset order for the samples the loader covered, and their mask."""
    feats, idx = extract_features(embed, loader, device=device, normalize=True)
    if feats.shape[0] == 0:
        raise ConfigError(f"evaluate: {name} loader yielded no batches; check the dataset")
    if int(idx.max()) >= n:
        raise ConfigError(
            f"evaluate: {name} loader yields index {int(idx.max())} but {name}_labels has only "
            f"{n} rows; pass labels for the same dataset the loader reads"
        )
    feats, present = dedup_by_index(feats, idx, n)
    return feats, present.numpy()


def evaluate(
    embed: Callable,
    train_loader: Iterable,
    test_loader: Iterable,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    level_names: Sequence[str],
    k: int = 20,
    temperature: float = 0.07,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Evaluate frozen features at every level of the label hierarchy.

    For label level ``j`` named ``level_names[j]``: ``knn_acc/<name>`` (weighted kNN from
    train to test features, :func:`hirl_ray.eval.knn.knn_predict`), and on the test features
    k-means with ``k`` = #classes at that level, scored as ``nmi/<name>``, ``ari/<name>``,
    ``acc/<name>`` (Hungarian). Samples the loaders never yielded and labels ``< 0``
    (unlabeled at that level) are left out; a level with no labelled sample in either split
    gets no keys.

    If ``embed`` is an ``nn.Module`` (or a bound method of one) it is put in eval mode for
    the duration (BatchNorm, lightly #1444) and its flags are restored afterwards.

    Args:
        embed: Maps an image batch to ``(B, D)`` features.
        train_loader: Yields ``(images, index)`` over the train split (the kNN memory bank).
        test_loader: Yields ``(images, index)`` over the test split.
        train_labels: ``(N_train, L)`` labels, column 0 finest; rows are dataset indices.
        test_labels: ``(N_test, L)`` labels.
        level_names: ``L`` names used in the metric keys, finest first.
        k: kNN neighbours (fixed default, see :mod:`hirl_ray.eval.knn`).
        temperature: kNN vote temperature.
        device: Where ``embed`` runs; features are kept on CPU.
        seed: k-means seed.

    Returns:
        Flat ``{metric/level: value}`` dict, values in ``[0, 1]`` (ARI in ``[-1, 1]``);
        ``{}`` when ``L == 0`` (unlabeled data), without touching the loaders.
    """
    y_train = _labels_2d(train_labels, "train_labels")
    y_test = _labels_2d(test_labels, "test_labels")
    if y_train.shape[1] == 0 or y_test.shape[1] == 0:
        return {}  # unlabeled data: nothing to score, and no reason to run the encoder
    if y_train.shape[1] != y_test.shape[1] or len(level_names) != y_train.shape[1]:
        raise ConfigError(
            f"evaluate: train/test labels have {y_train.shape[1]}/{y_test.shape[1]} levels and "
            f"level_names has {len(level_names)}; they must all agree"
        )

    owner = embed if isinstance(embed, nn.Module) else getattr(embed, "__self__", None)
    with eval_mode(owner) if isinstance(owner, nn.Module) else contextlib.nullcontext():
        f_train, seen_train = _features(embed, train_loader, len(y_train), device, "train")
        f_test, seen_test = _features(embed, test_loader, len(y_test), device, "test")

    metrics: dict[str, float] = {}
    for j, name in enumerate(level_names):
        tr = seen_train & (y_train[:, j] >= 0)
        te = seen_test & (y_test[:, j] >= 0)
        tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
        if not tr.any() or not te.any():
            continue  # no labelled samples at this level: nothing to score
        metrics[f"knn_acc/{name}"] = knn_accuracy(
            f_train[tr_t], y_train[tr, j], f_test[te_t], y_test[te, j], k=k, temperature=temperature
        )
        truth = y_test[te, j]
        pred = kmeans_labels(f_test[te_t].numpy(), k=np.unique(truth).size, seed=seed)
        for key, value in clustering_scores(truth, pred).items():
            metrics[f"{key}/{name}"] = value
    return metrics
