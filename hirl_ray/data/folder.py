"""ImageNet-layout image folders: ``root/{train,val|test}/<class>/<image>``.

Images stay on disk and are decoded lazily as RGB ``PIL.Image`` objects; the transform
(``multi_view_transform`` / ``eval_transform``) crops them to ``data.image_size``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, make_dataset

from hirl_ray.config import ConfigError
from hirl_ray.data.base import HierDataset

# Which folder names serve each split, in order of preference (ImageNet calls its test split "val").
SPLIT_FOLDERS = {"train": ("train",), "test": ("val", "test")}
#: One label level: the class folder.
LEVEL_NAMES = ("class",)


def _split_dir(root: Path, split: str) -> Path:
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    wanted = " or ".join(f"{root / n}/" for n in SPLIT_FOLDERS[split])
    raise ConfigError(
        f"data.root={root}: missing {split} split folder {wanted} "
        "with one sub-folder of images per class"
    )


class ImageFolderDataset(HierDataset):
    """One split of an image folder; labels are (N, 1) class indices.

    Class indices come from the *train* folder's sorted class names (when it exists), so the
    train and test splits agree even if the test split lacks a class.

    Args:
        root: the dataset root holding the split folders.
        split: ``"train"`` or ``"test"`` (read from ``val/`` or ``test/``).
    """

    def __init__(self, root: str | Path, split: str) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ConfigError(
                f"data.root={root} is not a folder; point it at a folder with "
                "train/ and val/ (or test/) class sub-folders"
            )
        folder = _split_dir(root, split)
        class_source = root / "train" if (root / "train").is_dir() else folder
        try:
            classes, class_to_idx = find_classes(str(class_source))
        except FileNotFoundError:
            raise ConfigError(
                f"data.root={root}: {class_source}/ has no class sub-folders; "
                "put each class's images in its own sub-folder"
            ) from None
        extra = sorted({p.name for p in folder.iterdir() if p.is_dir()} - set(classes))
        if extra:
            raise ConfigError(
                f"data.root={root}: {folder.name}/ has classes {extra[:5]} that "
                f"are not in {class_source.name}/; use the same class folders"
            )
        samples = make_dataset(
            str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True
        )
        if not samples:
            raise ConfigError(
                f"data.root={root}: {folder}/ holds no images "
                f"({', '.join(IMG_EXTENSIONS[:4])}, ...) in its class sub-folders"
            )
        self.root = root
        self.classes: list[str] = classes
        self.paths = [p for p, _ in samples]
        self.labels = np.asarray([t for _, t in samples], dtype=np.int64).reshape(-1, 1)
        self.level_names = LEVEL_NAMES

    def image(self, i: int) -> Image.Image:
        return default_loader(self.paths[i])  # PIL, converted to RGB
