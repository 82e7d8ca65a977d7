"""Dataset base classes shared by every source, and the label-tree helper.

Every dataset yields ``(image, index)``: HIRL keeps one cluster assignment per training
sample and per level (Sec. 3.1), so the training step needs each sample's dataset index
to look up its prototype path. Labels are never used for training, only for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hirl_ray.config import ConfigError


class HierDataset(Dataset):
    """Base dataset: ``__getitem__(i) -> (image, i)``.

    ``image`` is a uint8 CHW tensor (in-memory sets) or an RGB ``PIL.Image`` (imagefolder).

    Attributes:
        labels: (N, L) int64 ground-truth labels, column 0 = finest level; (N, 0) if unlabeled.
        level_names: L names, finest first, e.g. ``("subclass", "class", "superclass")``.
    """

    labels: np.ndarray
    level_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image(self, i: int) -> Any:
        """The raw image of sample ``i`` (subclasses implement this)."""
        raise NotImplementedError

    def load(self, i: int, max_reduction: Callable[[int, int], int] | None = None) -> Any:
        """:meth:`image` for a transform: datasets that decode files may decode at up to
        ``max_reduction(width, height)`` times smaller per side (the transform's
        ``max_reduction``: a size at which its output does not change). In-memory sets ignore
        it."""
        return self.image(i)

    def bad_file_mask(self) -> torch.Tensor | None:
        """``(N,)`` uint8, 1 where an unreadable file was skipped (``data.on_bad_file=skip``);
        ``None`` for sets that read no files per sample."""
        return None

    def bad_files(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of source files found broken by a cheap scan (no decoding);
        in-memory datasets have none."""
        return []

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.image(i), int(i)


class TensorHierDataset(HierDataset):
    """In-memory dataset: all images in one uint8 (N, 3, H, W) tensor (fast indexing, pickles
    as one buffer when shipped to Ray workers)."""

    def __init__(
        self, images: torch.Tensor, labels: np.ndarray, level_names: Sequence[str]
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        labels = np.asarray(labels, dtype=np.int64).reshape(len(images), -1)
        if labels.shape[1] != len(level_names):
            raise ValueError(
                f"labels have {labels.shape[1]} columns but {len(level_names)} "
                "level names were given"
            )
        self.images = images.contiguous()
        self.labels = labels
        self.level_names = tuple(level_names)

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]


class ViewDataset(Dataset):
    """Wraps a :class:`HierDataset` with a transform: ``__getitem__(i) -> (transform(image), i)``.

    With a :class:`~hirl_ray.data.transforms.MultiViewTransform` (a method's ``transform``) the
    first element is a list of views, which ``torch.utils.data.default_collate`` batches into a
    list of ``(B, 3, H_i, W_i)`` tensors, one per view pipeline.
    """

    def __init__(self, base: HierDataset, transform: Callable[[Any], Any]) -> None:
        self.base = base
        self.transform = transform

    @property
    def labels(self) -> np.ndarray:
        """The wrapped dataset's (N, L) labels."""
        return self.base.labels

    @property
    def level_names(self) -> tuple[str, ...]:
        """The wrapped dataset's level names."""
        return self.base.level_names

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        load = getattr(self.base, "load", None)
        if load is None:  # any map-style dataset of (image, index)
            image, index = self.base[i]
            return self.transform(image), index
        # A transform that knows its crops lets a file be decoded at reduced size (draft).
        return self.transform(load(i, getattr(self.transform, "max_reduction", None))), int(i)


def label_parents(
    labels: np.ndarray, level_names: Sequence[str] | None = None
) -> tuple[np.ndarray, ...]:
    """Parent map between consecutive label levels, checking that the labels form a tree.

    Mirrors ``PrototypeHierarchy.parents`` (HIRL Sec. 3.1) for ground-truth labels, so
    hierarchy metrics can compare learned and true trees.

    Args:
        labels: (N, L) integer labels, column 0 = finest level.
        level_names: optional names for the error message.

    Returns:
        ``L - 1`` int64 arrays; ``parents[l][c]`` is the level-``l+1`` label of level-``l`` class
        ``c`` (length ``max(labels[:, l]) + 1``; ``-1`` for ids that never occur).

    Raises:
        ConfigError: if a class has more than one parent (the labels are not a tree).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, L), got shape {labels.shape}")
    names = (
        tuple(level_names)
        if level_names is not None
        else tuple(f"level {i}" for i in range(labels.shape[1]))
    )
    parents = []
    for lvl in range(labels.shape[1] - 1):
        child, parent = labels[:, lvl].astype(np.int64), labels[:, lvl + 1].astype(np.int64)
        out = np.full(int(child.max(initial=-1)) + 1, -1, dtype=np.int64)
        out[child] = parent  # any one parent; checked for uniqueness below
        bad = np.flatnonzero(out[child] != parent)
        if bad.size:
            c = child[bad[0]]
            found = sorted(set(parent[child == c].tolist()))
            raise ConfigError(
                f"labels are not a tree: {names[lvl]} {c} has several "
                f"{names[lvl + 1]} parents {found}; fix the coarse labels"
            )
        parents.append(out)
    return tuple(parents)
