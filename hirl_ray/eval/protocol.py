"""Evaluation protocols: the interface, the registry hook, the shared inputs and the runner.

A protocol is one file in ``hirl_ray/eval/``: a subclass of :class:`EvalProtocol` with a
``name``, optionally its own frozen ``Config`` dataclass (the ``eval.params.<name>:`` section,
parsed and checked by the same strict loader as every other section), and ``run(inputs)``
returning flat ``{key: float}`` metrics. ``@register_protocol`` puts it in
:data:`hirl_ray.config.PROTOCOLS`, which is what ``eval.protocols`` is checked against.

All protocols of one evaluation share one :class:`EvalInputs`: frozen features of the train
and test splits are extracted at most once, on first use, and only if some protocol asks for
them (the hierarchy-consistency protocol, for one, needs only labels and the prototype tree).

Pure PyTorch / numpy; nothing here imports ``ray``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from hirl_ray.config import PROTOCOLS, ConfigError
from hirl_ray.eval.features import dedup_by_index, eval_mode, extract_features

if TYPE_CHECKING:
    from hirl_ray.hierarchy.kmeans import PrototypeHierarchy

SPLITS = ("train", "test")


@dataclass(frozen=True)
class NoConfig:
    """The ``eval.params.<name>`` section of a protocol without settings (always ``{}``)."""


class EvalProtocol:
    """One way of scoring frozen features; subclass it in its own file in ``hirl_ray/eval/``.

    Attributes:
        name: The name listed in ``eval.protocols`` (and the ``eval.params`` key).
        Config: Frozen dataclass of the protocol's settings, ``eval.params.<name>``; its
            ``check(self, where)`` (if any) runs at load time, like every section's.
        level_metrics: Metric prefixes scored once per label level, as keys
            ``<prefix>/<level name>`` (e.g. ``("knn_acc",)`` gives ``knn_acc/superclass``).
        metric_prefixes: Prefixes of the protocol's other keys (``<prefix>/...``).
        needs_backbone: The protocol trains the backbone itself (fine-tuning), so it needs a
            checkpoint's backbone (``EvalInputs.encoder``); the online evaluation during
            training (``eval.every_epochs``) skips such protocols.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    level_metrics: ClassVar[tuple[str, ...]] = ()
    metric_prefixes: ClassVar[tuple[str, ...]] = ()
    needs_backbone: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        self.config = type(self).Config() if config is None else config

    @classmethod
    def level_metrics_for(cls, config: Any) -> tuple[str, ...]:
        """Per-level prefixes written under ``config`` (``level_metrics`` unless a setting
        adds keys, e.g. several kNN ``k``)."""
        return cls.level_metrics

    def run(self, inputs: EvalInputs) -> dict[str, float]:
        """Score ``inputs``; keys as declared by ``level_metrics`` / ``metric_prefixes``."""
        raise NotImplementedError


def register_protocol(cls: type[EvalProtocol]) -> type[EvalProtocol]:
    """Class decorator: make ``cls`` selectable as ``eval.protocols: [<cls.name>]``."""
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise TypeError(f"{cls.__qualname__}: set the class attribute name = '<protocol>'")
    PROTOCOLS.register(cls.name, cls)
    return cls


def _protocols(names: Iterable[str] | None) -> list[type[EvalProtocol]]:
    return [PROTOCOLS.get(n) for n in (PROTOCOLS.names() if names is None else names)]


def level_metric_prefixes(names: Iterable[str] | None = None,
                          params: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """Prefixes of the per-level metrics (``<prefix>/<level name>``) the protocols produce.

    Args:
        names: Protocol names (e.g. ``cfg.eval.protocols``); ``None`` means every registered
            protocol, in registration order (``knn_acc, nmi, ari, acc`` for the built-ins).
        params: ``cfg.eval.params``: settings that add keys (several kNN ``k``) are counted.
    """
    params = params or {}
    return tuple(dict.fromkeys(
        m for p in _protocols(names)
        for m in (p.level_metrics_for(params[p.name]) if p.name in params else p.level_metrics)))


def metric_prefixes(names: Iterable[str] | None = None,
                    params: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """Every key prefix the protocols produce: per-level ones first, then the others."""
    others = (m for p in _protocols(names) for m in p.metric_prefixes)
    return tuple(dict.fromkeys((*level_metric_prefixes(names, params), *others)))


def _labels_2d(labels: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(labels)
    y = y.reshape(-1, 1) if y.ndim == 1 else y
    if y.ndim != 2:
        raise ConfigError(f"evaluate: {name} must be (N, L) integer labels, got shape {y.shape}")
    return y.astype(np.int64)


@dataclass(frozen=True)
class Level:
    """One label level with labelled samples in both splits (features L2-normalised, CPU)."""

    index: int
    name: str
    train_x: Tensor
    train_y: np.ndarray
    test_x: Tensor
    test_y: np.ndarray


#: ``split -> (features (N, D) in dataset order, seen (N,) bool)``; see :func:`loader_features`.
FeatureSource = Callable[[str], tuple[Tensor, np.ndarray]]


@dataclass(frozen=True)
class EvalInputs:
    """What every protocol of one evaluation reads.

    Attributes:
        train_labels: ``(N_train, L)`` int64 labels, column 0 finest; ``-1`` = unlabeled at
            that level. Rows are dataset indices.
        test_labels: ``(N_test, L)`` int64 labels.
        level_names: ``L`` names used in metric keys, finest first.
        source: Extracts one split's features (called at most once per split, on first use).
        device: Where the encoder runs.
        seed: Seed for protocols that draw random numbers (k-means).
        hierarchy: The run's prototype tree, when one exists (its assignments index the
            train split).
        encoder: Returns a FRESH trainable copy of the pretrained backbone on each call
            (``(B, 3, H, W) -> (B, feat_dim)``), for protocols that train it (``finetune``,
            ``semisup``); ``None`` when only features are available (e.g. ``evaluate`` on
            a feature callable), and those protocols then raise a ConfigError.
        feat_dim: Width of the encoder's output; ``None`` if unknown (probed on one image).
        train_images: The train split as a dataset of ``(image, index)``: the evaluation
            transform's (un-augmented, normalised) ``(3, H, W)`` tensor and the row of
            ``train_labels`` it belongs to.
        test_images: The test split, likewise (rows of ``test_labels``).
        cluster_sizes: The run's ``hirl.num_clusters`` (label-free criteria score the trial's
            own sizes when no tree exists yet).
    """

    train_labels: np.ndarray
    test_labels: np.ndarray
    level_names: tuple[str, ...]
    source: FeatureSource | None = None
    device: str = "cpu"
    seed: int = 0
    hierarchy: PrototypeHierarchy | None = None
    encoder: Callable[[], nn.Module] | None = None
    feat_dim: int | None = None
    train_images: Dataset | None = None
    test_images: Dataset | None = None
    cluster_sizes: tuple[int, ...] = ()
    _cache: dict[str, tuple[Tensor, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        y_train = _labels_2d(self.train_labels, "train_labels")
        y_test = _labels_2d(self.test_labels, "test_labels")
        object.__setattr__(self, "train_labels", y_train)
        object.__setattr__(self, "test_labels", y_test)
        object.__setattr__(self, "level_names", tuple(self.level_names))
        if y_train.shape[1] and y_test.shape[1] and not (
                y_train.shape[1] == y_test.shape[1] == len(self.level_names)):
            raise ConfigError(
                f"evaluate: train/test labels have {y_train.shape[1]}/{y_test.shape[1]} levels "
                f"and level_names has {len(self.level_names)}; they must all agree")

    @property
    def num_levels(self) -> int:
        """Label levels scored; ``0`` for unlabeled data (either split without labels)."""
        return min(self.train_labels.shape[1], self.test_labels.shape[1])

    def features(self, split: str) -> tuple[Tensor, np.ndarray]:
        """``(features, seen)`` of ``split``: ``(N, D)`` rows in dataset order, extracted once.

        ``seen[i]`` is False for samples the loader never yielded (their row is zeros).
        """
        if split not in SPLITS:
            raise ValueError(f"EvalInputs.features: split must be one of {SPLITS}, got {split!r}")
        if split not in self._cache:
            if self.source is None:
                raise ValueError("EvalInputs: no feature source; pass loaders or features")
            self._cache[split] = self.source(split)
        return self._cache[split]

    def levels(self) -> Iterator[Level]:
        """Label levels with labelled samples in both splits, finest first.

        Samples never seen and labels ``< 0`` are left out; a level with no labelled sample
        in either split is skipped. Unlabeled data yields nothing and extracts nothing.
        """
        if self.num_levels == 0:
            return
        f_train, seen_train = self.features("train")
        f_test, seen_test = self.features("test")
        for j, name in enumerate(self.level_names):
            tr = seen_train & (self.train_labels[:, j] >= 0)
            te = seen_test & (self.test_labels[:, j] >= 0)
            if not tr.any() or not te.any():
                continue
            yield Level(j, name, f_train[torch.from_numpy(tr)], self.train_labels[tr, j],
                        f_test[torch.from_numpy(te)], self.test_labels[te, j])


def loader_features(embed: Callable[[Tensor], Tensor], loaders: Mapping[str, Iterable],
                    sizes: Mapping[str, int], device: torch.device | str) -> FeatureSource:
    """A :data:`FeatureSource` that embeds each split's loader of ``(images, index)`` batches.

    Features are L2-normalised, kept on CPU and put in dataset order (sampler padding
    de-duplicated by index). If ``embed`` is an ``nn.Module`` (or a bound method of one) it
    runs in eval mode (BatchNorm, lightly #1444) and its flags are restored afterwards.
    """
    owner = embed if isinstance(embed, nn.Module) else getattr(embed, "__self__", None)

    def source(split: str) -> tuple[Tensor, np.ndarray]:
        n = sizes[split]
        with eval_mode(owner) if isinstance(owner, nn.Module) else contextlib.nullcontext():
            feats, idx = extract_features(embed, loaders[split], device=device, normalize=True)
        if feats.shape[0] == 0:
            raise ConfigError(f"evaluate: {split} loader yielded no batches; check the dataset")
        if int(idx.max()) >= n:
            raise ConfigError(
                f"evaluate: {split} loader yields index {int(idx.max())} but {split}_labels has "
                f"only {n} rows; pass labels for the same dataset the loader reads")
        feats, present = dedup_by_index(feats, idx, n)
        return feats, present.numpy()

    return source


def run_protocols(names: Sequence[str], inputs: EvalInputs,
                  params: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Run the protocols ``names`` in order on shared ``inputs``; merge their metrics.

    Args:
        names: Registered protocol names (``cfg.eval.protocols``).
        inputs: The shared inputs.
        params: ``name -> Config`` instance (``cfg.eval.params``); a missing name runs with
            its ``Config()`` defaults.

    Returns:
        The union of every protocol's metrics; two protocols writing one key is an error.
    """
    params = params or {}
    metrics: dict[str, float] = {}
    for name in names:
        cls = PROTOCOLS.get(name)
        out = cls(params.get(name)).run(inputs)
        clash = sorted(set(out) & set(metrics))
        if clash:
            raise ValueError(f"eval protocol {name!r} writes {clash[0]!r}, which an earlier "
                             "protocol already wrote; give its keys their own prefix")
        metrics.update(out)
    return metrics
