"""Datasets and augmentations.

Every dataset is a :class:`HierDataset` whose items are ``(image, index)``; ground-truth labels
(``labels``, finest level first) are only used for evaluation. Wrap one in :class:`ViewDataset`
with :func:`multi_view_transform` for pretraining or :func:`eval_transform` for feature
extraction; ``torch.utils.data.default_collate`` batches both (views become a list of tensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hirl_ray import storage
from hirl_ray.config import DATASETS, ConfigError, DataConfig
from hirl_ray.data.base import HierDataset, TensorHierDataset, ViewDataset, label_parents
from hirl_ray.data.folder import LEVEL_NAMES as FOLDER_LEVELS
from hirl_ray.data.folder import SPLIT_FOLDERS
from hirl_ray.data.synthetic import LEVEL_NAMES as SYNTHETIC_LEVELS
from hirl_ray.data.transforms import MEAN, STD, eval_transform, multi_view_transform

SPLITS = ("train", "test")
#: Remote ``data.root`` schemes the data layer reads (a per-node cache: ``hirl_ray.data.s3``).
READABLE_SCHEMES = ("s3",)


def _synthetic(cfg: DataConfig, split: str) -> HierDataset:
    from hirl_ray.data.synthetic import SyntheticHierarchy

    n = cfg.train_per_class if split == "train" else cfg.test_per_class
    return SyntheticHierarchy(split, n_per_leaf=n, image_size=cfg.image_size, seed=cfg.seed)


def _imagefolder(cfg: DataConfig, split: str) -> HierDataset:
    from hirl_ray.data.folder import ImageFolderDataset

    return ImageFolderDataset(str(cfg.root), split, cfg.on_bad_file)


def _npz(cfg: DataConfig, split: str) -> HierDataset:
    from hirl_ray.data.arrays import npz_dataset

    return npz_dataset(str(cfg.root), split, cfg.image_size, cfg.seed)


def _cifar(cfg: DataConfig, split: str) -> HierDataset:
    from hirl_ray.data.arrays import cifar_dataset

    return cifar_dataset(cfg.name, str(cfg.root), split, cfg.image_size)


def _stl10(cfg: DataConfig, split: str) -> HierDataset:
    from hirl_ray.data.stl10 import stl10_dataset

    return stl10_dataset(str(cfg.root), split, cfg.image_size)


def _digits(cfg: DataConfig, split: str) -> HierDataset:
    from hirl_ray.data.arrays import digits_dataset

    return digits_dataset(split, cfg.image_size, cfg.seed)


def register_dataset(name: str, builder: Callable[[DataConfig, str], HierDataset],
                     needs_root: bool = True, level_names: tuple[str, ...] | None = None
                     ) -> None:
    """Make ``data.name: <name>`` build splits with ``builder(cfg, split)``.

    ``needs_root``: the loader refuses the dataset without ``data.root``. ``level_names``: the
    label levels (finest first) when fixed for the dataset, so the driver knows them without
    loading images (:func:`dataset_level_names`); ``None`` when they depend on the files.
    """

    def build(cfg: DataConfig, split: str) -> HierDataset:
        return builder(cfg, split)

    build.needs_root = needs_root  # type: ignore[attr-defined]
    build.__module__ = builder.__module__  # where a Ray worker imports it from
    build.level_names = level_names  # type: ignore[attr-defined]
    build.__qualname__ = f"dataset:{name}"
    DATASETS.register(name, build)


register_dataset("synthetic", _synthetic, needs_root=False, level_names=SYNTHETIC_LEVELS)
register_dataset("imagefolder", _imagefolder, level_names=FOLDER_LEVELS)
register_dataset("npz", _npz)
register_dataset("cifar10", _cifar)
register_dataset("cifar100", _cifar)
register_dataset("digits", _digits, needs_root=False)
register_dataset("stl10", _stl10, level_names=("class",))


def build_dataset(cfg: DataConfig, split: str, local_copy: bool = True) -> HierDataset:
    """Build one split of the dataset named by ``cfg.name``.

    Args:
        cfg: the ``data:`` config section.
        split: ``"train"`` or ``"test"``.
        local_copy: an ``s3://`` root is downloaded once per node
            (:func:`~hirl_ray.data.s3.localize`); ``False``: an ``s3://`` image folder is
            listed and its images read object by object when used (the
            ``data.loader=ray_data`` path; same samples, same order).

    Raises:
        ConfigError: unknown name, missing ``data.root``, or unreadable/ill-shaped data.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    builder = DATASETS.get(cfg.name)
    if builder.needs_root and not cfg.root:
        raise ConfigError(
            f"data.root is required for data.name={cfg.name!r}; set it to the dataset's local path"
        )
    if _remote_root(cfg) and not local_copy and cfg.name == "imagefolder":
        from hirl_ray.data.s3 import list_image_folder

        return list_image_folder(str(cfg.root), split, cfg.on_bad_file)
    if _remote_root(cfg):
        from hirl_ray.data.s3 import localize

        cfg = dataclasses.replace(cfg, root=str(localize(str(cfg.root))))
    return builder(cfg, split)


def _remote_root(cfg: DataConfig) -> bool:
    """Whether ``data.root`` is remote; a remote scheme we cannot read is a ConfigError."""
    if not cfg.root or not storage.is_remote(cfg.root):
        return False
    scheme = storage.scheme(cfg.root)
    if scheme not in READABLE_SCHEMES:
        raise ConfigError(
            f"data.root={cfg.root}: the data layer cannot read {scheme}:// yet; use a local "
            f"path or one of {', '.join(f'{s}://' for s in READABLE_SCHEMES)}")
    return True


def dataset_level_names(cfg: DataConfig, split: str = "train") -> tuple[str, ...]:
    """Label levels of the dataset, finest first, without loading images when they are fixed.

    Datasets registered with ``level_names`` (synthetic, imagefolder) answer at once, so the
    driver of a sweep does not download an ``s3://`` image folder to learn them; the others
    are built (small arrays: npz, CIFAR, digits).
    """
    fixed = DATASETS.get(cfg.name).level_names
    return tuple(fixed) if fixed is not None else tuple(build_dataset(cfg, split).level_names)


def dataset_size(cfg: DataConfig, split: str) -> int:
    """Number of samples in one split, without downloading an ``s3://`` image folder.

    The driver only needs the count (to check batch and cluster sizes and to size the prototype
    actor); the workers download their node's copy when they build the dataset. Other datasets
    (and npz files in S3, a single object each) are built as usual.
    """
    if cfg.name == "imagefolder" and _remote_root(cfg):
        from hirl_ray.data.s3 import count_folder_images

        for folder in SPLIT_FOLDERS[split]:
            n = count_folder_images(cfg.root, folder)
            if n:
                return n
        raise ConfigError(
            f"data.root={cfg.root}: no images under "
            f"{' or '.join(f'{f}/<class>/' for f in SPLIT_FOLDERS[split])}; upload the "
            "ImageFolder layout (train/ and val/ class sub-folders)"
        )
    return len(build_dataset(cfg, split))


@dataclass(frozen=True)
class SplitFacts:
    """What the driver learns about one split before Ray starts.

    ``level_names``: label levels, finest first; ``classes``: distinct labels per level, ``None``
    when unknown without downloading (an ``s3://`` image folder is only counted);
    ``bad_files``: ``(path, reason)`` found by :meth:`HierDataset.bad_files` (no decoding).
    """

    size: int
    level_names: tuple[str, ...]
    classes: tuple[int, ...] | None
    bad_files: tuple[tuple[str, str], ...]


def describe_split(cfg: DataConfig, split: str) -> SplitFacts:
    """Size, classes per level and cheaply found broken files of one split."""
    if cfg.name == "imagefolder" and _remote_root(cfg):
        from hirl_ray.data.s3 import scan_folder

        names = dataset_level_names(cfg, split)  # fixed for image folders: nothing downloaded
        for folder in SPLIT_FOLDERS[split]:
            n, bad = scan_folder(str(cfg.root), folder)
            if n:
                return SplitFacts(n, names, None, tuple(bad))
        return SplitFacts(dataset_size(cfg, split), names, None, ())  # raises: no images
    ds = build_dataset(cfg, split)
    labels = np.asarray(ds.labels)
    classes = tuple(int(np.unique(labels[:, j][labels[:, j] >= 0]).size)
                    for j in range(labels.shape[1]))
    return SplitFacts(len(ds), tuple(ds.level_names), classes, tuple(ds.bad_files()))


__all__ = [
    "DATASETS",
    "register_dataset",
    "dataset_size",
    "describe_split",
    "SplitFacts",
    "dataset_level_names",
    "HierDataset",
    "TensorHierDataset",
    "ViewDataset",
    "build_dataset",
    "label_parents",
    "multi_view_transform",
    "eval_transform",
    "MEAN",
    "STD",
]
