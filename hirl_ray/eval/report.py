"""Frozen-feature evaluation: run the configured protocols on one encoder and two splits.

:func:`run_evaluation` is what the final evaluation (``eval/checkpoint.py``) calls: it wraps
the loaders in one :class:`~hirl_ray.eval.protocol.EvalInputs` (features extracted once, on
first use) and runs ``cfg.protocols`` with their ``cfg.params``. :func:`evaluate` is the older
fixed-protocol entry point (kNN + clustering), kept for the online evaluation in the Ray worker.
:func:`build_inputs` and :func:`run_grouped` are the two halves of :func:`run_evaluation`, for
callers that want the shared inputs afterwards (the plots of ``hirl_ray.evaluate``) or the
metrics per protocol (``hirl-ray eval`` prints them grouped).

Pure PyTorch / numpy; nothing here imports ``ray``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hirl_ray.config import EvalConfig
from hirl_ray.eval.knn import KnnConfig
from hirl_ray.eval.protocol import EvalInputs, loader_features, run_protocols
from hirl_ray.logs import get_logger

if TYPE_CHECKING:
    from hirl_ray.hierarchy.kmeans import PrototypeHierarchy

log = get_logger(__name__)


def run_evaluation(
    embed: Callable,
    cfg: EvalConfig,
    train_loader: Iterable,
    test_loader: Iterable,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    level_names: Sequence[str],
    device: torch.device | str = "cpu",
    seed: int = 0,
    hierarchy: PrototypeHierarchy | None = None,
    cluster_sizes: Sequence[int] = (),
) -> dict[str, float]:
    """Evaluate ``embed`` with every protocol in ``cfg.protocols``.

    Args:
        embed: Maps an image batch to ``(B, D)`` features; an ``nn.Module`` (or a bound method
            of one) runs in eval mode and its flags are restored afterwards.
        cfg: The ``eval:`` section (``protocols`` and their ``params``).
        train_loader: Yields ``(images, index)`` over the train split (e.g. the kNN memory bank).
        test_loader: Yields ``(images, index)`` over the test split.
        train_labels: ``(N_train, L)`` labels, column 0 finest; rows are dataset indices.
        test_labels: ``(N_test, L)`` labels.
        level_names: ``L`` names used in the metric keys, finest first.
        device: Where ``embed`` runs; features are kept on CPU.
        seed: Seed of the protocols' random draws (k-means).
        hierarchy: The run's prototype tree, for the ``consistency`` protocol.
        cluster_sizes: The run's ``hirl.num_clusters``, for the ``label_free`` protocol.

    Returns:
        Flat ``{key: value}`` metrics of all protocols (e.g. ``knn_acc/superclass``).
    """
    inputs = build_inputs(embed, train_loader, test_loader, train_labels, test_labels,
                          level_names, device, seed, hierarchy,
                          extra={"cluster_sizes": tuple(cluster_sizes)})
    return run_protocols(cfg.protocols, inputs, cfg.params)


def build_inputs(embed: Callable, train_loader: Iterable, test_loader: Iterable,
                 train_labels: np.ndarray, test_labels: np.ndarray, level_names: Sequence[str],
                 device: torch.device | str = "cpu", seed: int = 0,
                 hierarchy: PrototypeHierarchy | None = None,
                 extra: Mapping[str, Any] | None = None) -> EvalInputs:
    """The :class:`EvalInputs` of :func:`run_evaluation` (features extracted on first use).

    Args:
        extra: Further :class:`EvalInputs` fields (e.g. ``encoder``, ``train_images``); a name
            that this version of :class:`EvalInputs` does not have is dropped, so callers can
            offer inputs that only some protocols (and some versions) read.
        Others: as in :func:`run_evaluation`.
    """
    known = {f.name for f in dataclasses.fields(EvalInputs) if f.init}
    offered = {k: v for k, v in (extra or {}).items() if k in known}
    inputs = EvalInputs(train_labels, test_labels, tuple(level_names), device=str(device),
                        seed=seed, hierarchy=hierarchy, **offered)
    sizes = {"train": len(inputs.train_labels), "test": len(inputs.test_labels)}
    loaders = {"train": train_loader, "test": test_loader}
    return dataclasses.replace(inputs, source=loader_features(embed, loaders, sizes, device))


def run_grouped(names: Sequence[str], inputs: EvalInputs,
                params: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """:func:`~hirl_ray.eval.protocol.run_protocols`, keeping each protocol's metrics apart.

    Returns:
        ``{protocol name: its metrics}`` in the order of ``names``; the same keys and values
        as ``run_protocols`` (two protocols writing one key is an error there and here).
    """
    groups: dict[str, dict[str, float]] = {}
    seen: dict[str, str] = {}
    for name in names:
        start = time.perf_counter()
        out = run_protocols([name], inputs, params)
        log.info("eval protocol %s: %d metrics in %.1fs", name, len(out),
                 time.perf_counter() - start)
        clash = sorted(set(out) & set(seen))
        if clash:
            raise ValueError(f"eval protocol {name!r} writes {clash[0]!r}, which protocol "
                             f"{seen[clash[0]]!r} already wrote; give its keys their own prefix")
        seen.update(dict.fromkeys(out, name))
        groups[name] = out
    return groups


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
    """kNN accuracy and k-means NMI/ARI/ACC at every label level (protocols ``knn`` and
    ``clustering``), with the kNN settings given directly.

    Keys ``knn_acc/<level>``, ``nmi/<level>``, ``ari/<level>``, ``acc/<level>``; samples the
    loaders never yielded and labels ``< 0`` are left out; a level with no labelled sample in
    either split gets no keys; unlabeled data (``L == 0``) gives ``{}`` without reading the
    loaders. See :func:`run_evaluation` for the arguments.
    """
    inputs = build_inputs(embed, train_loader, test_loader, train_labels, test_labels,
                          level_names, device, seed)
    return run_protocols(("knn", "clustering"), inputs,
                         {"knn": KnnConfig(k=k, temperature=temperature)})
