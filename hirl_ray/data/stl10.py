"""STL-10 (Coates, Ng & Lee, AISTATS 2011) from a local copy of its binary release.

The layout is the one torchvision's ``STL10(download=False)`` reads (``stl10_binary/``):
``train_X.bin`` / ``test_X.bin`` hold uint8 images ``(N, 3, 96, 96)`` stored column-major
(each channel transposed), ``train_y.bin`` / ``test_y.bin`` one uint8 label in 1..10 per
image. We read the files directly, without torchvision's MD5 check of all five files (the
100,000-image ``unlabeled_X.bin``, 2.6 GB, is not needed for evaluation), and resize in
chunks, so the 96 px originals never sit in memory all at once.

Labels: one level, ``class`` (airplane, bird, car, cat, deer, dog, horse, monkey, ship, truck:
5,000 train / 8,000 test images). STL-10 defines no coarse level; the obvious animal/vehicle
split is not a published grouping, so none is invented here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hirl_ray.config import ConfigError
from hirl_ray.data.arrays import resize_batch
from hirl_ray.data.base import TensorHierDataset

BASE_FOLDER = "stl10_binary"
SIDE = 96
LEVEL_NAMES = ("class",)
NUM_CLASSES = 10
_CHUNK = 1000  # images resized at a time (~28 MB of 96 px uint8)


def _folder(root: str | Path) -> Path:
    root = Path(root).expanduser()
    for folder in (root / BASE_FOLDER, root):
        if (folder / "train_X.bin").is_file() or (folder / "test_X.bin").is_file():
            return folder
    raise ConfigError(
        f"data.root={root}: STL-10 not found (expected {BASE_FOLDER}/train_X.bin and "
        f"test_X.bin); extract stl10_binary.tar.gz there first (no network at run time)")


def stl10_dataset(root: str | Path, split: str, image_size: int) -> TensorHierDataset:
    """The labelled ``train`` (5,000) or ``test`` (8,000) split, resized to ``image_size``.

    Args:
        root: The folder holding ``stl10_binary/`` (torchvision's ``root``) or that folder.
        split: ``"train"`` or ``"test"``.
        image_size: Side length after resizing (short side, antialiased, then center crop).

    Raises:
        ConfigError: Missing files, a truncated image file, labels outside 1..10 or a label
            count that differs from the image count (the message names the file).
    """
    folder = _folder(root)
    x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    for path in (x_path, y_path):
        if not path.is_file():
            raise ConfigError(f"data.root={root}: missing {path.name} in {folder}; the "
                              f"{split} split needs {x_path.name} and {y_path.name}")
    per_image = 3 * SIDE * SIDE
    size = x_path.stat().st_size
    if size == 0 or size % per_image:
        raise ConfigError(f"{x_path}: {size} bytes is not a whole number of 3x96x96 images; "
                          "the file is truncated, extract it again")
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
    n = size // per_image
    if labels.shape != (n,) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        got = f" in [{labels.min() + 1}, {labels.max() + 1}]" if labels.size else ""
        raise ConfigError(f"{y_path}: expected {n} labels in 1..{NUM_CLASSES} (one per image of "
                          f"{x_path.name}), got {labels.size}{got}")
    raw = np.memmap(x_path, dtype=np.uint8, mode="r", shape=(n, 3, SIDE, SIDE))
    chunks = []
    for start in range(0, n, _CHUNK):
        # Column-major on disk: swap H and W back (what torchvision does).
        block = np.ascontiguousarray(raw[start:start + _CHUNK].transpose(0, 1, 3, 2))
        chunks.append(resize_batch(torch.from_numpy(block), image_size))
    del raw
    return TensorHierDataset(torch.cat(chunks), labels[:, None], LEVEL_NAMES)
