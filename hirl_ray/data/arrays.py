"""In-memory array datasets: ``.npz`` files, CIFAR-10/100 (local copies) and sklearn digits.

All become a :class:`TensorHierDataset` holding one uint8 (N, 3, S, S) tensor, resized to
``data.image_size`` once at build time so the per-sample cost is just augmentation.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from hirl_ray.config import ConfigError
from hirl_ray.data.base import TensorHierDataset, label_parents

TEST_FRACTION = 0.2  # held-out share when a source has no predefined test split


def to_uint8_nchw(x: np.ndarray, where: str) -> torch.Tensor:
    """(N,H,W,3) / (N,3,H,W) / (N,H,W) uint8 or float-in-[0,1] array -> uint8 (N,3,H,W).

    ``where`` (e.g. ``"data.npz: array 'x'"``) prefixes every error message.
    """
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]  # grayscale
    elif x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # channels-last is the common case, so it wins ties
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise ConfigError(f"{where} must have shape (N,H,W,3), (N,3,H,W) or (N,H,W), got {x.shape}")
    if x.shape[0] == 0:
        raise ConfigError(f"{where} is empty")
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ConfigError(
                f"{where}: float images must lie in [0, 1], got [{lo:g}, {hi:g}]; "
                "rescale or store uint8"
            )
        x = np.rint(x * 255.0)
    elif x.dtype != np.uint8:
        if not np.issubdtype(x.dtype, np.integer) or x.min() < 0 or x.max() > 255:
            raise ConfigError(f"{where} must be uint8 or float in [0, 1], got {x.dtype}")
    t = torch.from_numpy(np.ascontiguousarray(x.astype(np.uint8, copy=False)))
    return t.expand(-1, 3, -1, -1).contiguous() if t.shape[1] == 1 else t


def resize_batch(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N,3,H,W) -> (N,3,size,size): short side to ``size`` (antialiased), center crop."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = [
        v2.functional.center_crop(
            v2.functional.resize(images[i : i + chunk], [size], antialias=True), [size, size]
        )
        for i in range(0, len(images), chunk)
    ]
    return torch.cat(out)


def split_indices(n: int, seed: int, split: str) -> np.ndarray:
    """Deterministic 80/20 train/test split of ``range(n)`` by ``seed`` (sorted indices)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(TEST_FRACTION * n))) if n > 1 else 0
    return np.sort(perm[n_test:] if split == "train" else perm[:n_test])


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read as .npz ({e}); save with numpy.savez") from None


def npz_dataset(root: str | Path, split: str, image_size: int, seed: int) -> TensorHierDataset:
    """``root`` is one ``.npz`` (split 80/20 by ``seed``) or a folder with train.npz/test.npz.

    Arrays: ``x`` images, optional ``y`` (N,) labels, optional ``y_coarse`` (N,) parent labels.
    Labels columns are (y, y_coarse); y_coarse must be a function of y (a tree). Without ``y``
    the images are unlabelled: training and the label-free criteria need no labels.
    """
    root = Path(root).expanduser()
    if root.is_dir():
        path, subset = root / f"{split}.npz", None
        if not path.is_file():
            raise ConfigError(
                f"data.root={root}: missing {path.name}; a folder needs "
                "train.npz and test.npz (or point data.root at one .npz)"
            )
    elif root.is_file():
        path, subset = root, split
    else:
        raise ConfigError(
            f"data.root={root} does not exist; point it at a .npz file or a "
            "folder with train.npz and test.npz"
        )
    arrays = _load_npz(path)
    if "x" not in arrays or ("y_coarse" in arrays and "y" not in arrays):
        raise ConfigError(
            f"{path}: needs array 'x' (images), optionally 'y' (labels) and 'y_coarse' (their "
            f"parents, only with 'y'), found {sorted(arrays)}"
        )
    images = to_uint8_nchw(arrays["x"], f"{path}: array 'x'")
    columns = []
    for key in ("y", "y_coarse"):
        if key not in arrays:
            continue
        y = arrays[key]
        if y.shape != (len(images),) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ConfigError(
                f"{path}: array '{key}' must be non-negative integers of shape "
                f"({len(images)},) to match 'x', got {y.dtype} {y.shape}"
            )
        columns.append(y.astype(np.int64))
    labels = np.stack(columns, axis=1) if columns else np.zeros((len(images), 0), np.int64)
    names = ("class", "superclass")[: labels.shape[1]]
    label_parents(labels, names)  # fail early if y_coarse is not a function of y
    if subset is not None:
        idx = split_indices(len(images), seed, subset)
        images, labels = images[torch.from_numpy(idx)], labels[idx]
    return TensorHierDataset(resize_batch(images, image_size), labels, names)


def cifar_dataset(name: str, root: str | Path, split: str, image_size: int) -> TensorHierDataset:
    """CIFAR-10 (labels: class) or CIFAR-100 (labels: class, superclass) from a local copy.

    ``root`` is the folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` (the
    torchvision layout) or that folder itself. Nothing is downloaded.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    root = Path(root).expanduser()
    if not (root / cls.base_folder).is_dir() and root.name == cls.base_folder:
        root = root.parent
    try:
        ds = cls(root=str(root), train=split == "train", download=False)
    except RuntimeError:
        raise ConfigError(
            f"data.root={root}: {name} not found (expected {cls.base_folder}/); "
            f"download the python version of {name} there first "
            "(no network at run time)"
        ) from None
    images = to_uint8_nchw(ds.data, f"{name} at {root}")
    fine = np.asarray(ds.targets, dtype=np.int64)
    if name == "cifar10":
        return TensorHierDataset(resize_batch(images, image_size), fine[:, None], ("class",))
    # torchvision keeps only fine labels; the 20 superclasses live in the same pickles.
    coarse = []
    for file_name, _ in cls.train_list if split == "train" else cls.test_list:
        with open(root / cls.base_folder / file_name, "rb") as f:
            coarse.extend(pickle.load(f, encoding="latin1")["coarse_labels"])
    labels = np.stack([fine, np.asarray(coarse, dtype=np.int64)], axis=1)
    return TensorHierDataset(resize_batch(images, image_size), labels, ("class", "superclass"))


def digits_dataset(split: str, image_size: int, seed: int) -> TensorHierDataset:
    """sklearn's 8x8 handwritten digits (1797 images, ships with scikit-learn), upsampled to
    ``image_size`` RGB; deterministic 80/20 split by ``seed``. Labels: (digit,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = split_indices(len(digits.images), seed, split)
    x = digits.images[idx] / 16.0  # pixel values are 0..16
    images = to_uint8_nchw(x, "sklearn digits")
    return TensorHierDataset(
        resize_batch(images, image_size), digits.target[idx].astype(np.int64)[:, None], ("digit",)
    )
