"""ImageNet-layout image folders: ``root/{train,val|test}/<class>/<image>``.

Images stay on disk and are decoded lazily as RGB ``PIL.Image`` objects; the transform
(``multi_view_transform`` / ``eval_transform``) crops them to ``data.image_size``. Grayscale,
palette, RGBA and CMYK files are converted to RGB; 16-bit grayscale is scaled to 8 bits.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

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


def load_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as 8-bit RGB.

    PIL's ``convert("RGB")`` clips 16-bit grayscale (``I;16``, e.g. medical or scientific PNGs)
    at 255, which turns almost every pixel white; those are scaled to 8 bits first.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        if img.mode.startswith("I;16"):
            img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8))
        return img.convert("RGB")


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
        # An empty class folder is almost always a failed copy: its class would silently
        # have no sample in this split.
        counts = Counter(t for _, t in samples)
        empty = sorted(c for c in classes if (folder / c).is_dir() and not counts[class_to_idx[c]])
        if empty:
            more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
            raise ConfigError(
                f"data.root={root}: class folder {folder.name}/{empty[0]}/{more} holds no images "
                f"({', '.join(IMG_EXTENSIONS[:4])}, ...); add images or remove the folder"
            )
        self.folder = folder
        self.root = root
        self.classes: list[str] = classes
        self.paths = [p for p, _ in samples]
        self.labels = np.asarray([t for _, t in samples], dtype=np.int64).reshape(-1, 1)
        self.level_names = LEVEL_NAMES

    def image(self, i: int) -> Image.Image:
        return load_rgb(self.paths[i])

    def bad_files(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of files found broken without decoding any image.

        Cheap enough for ImageNet on the driver (one listing, one ``stat`` per image): image
        files of zero bytes, and files in class folders whose extension is not an image's
        (the loader would skip them silently: a ``.gif`` or ``.heic`` class loses its samples).
        Hidden files (``.DS_Store``) are skipped. Truncated or corrupt images are only found
        when decoded, at run time.
        """
        bad = [(p, "zero bytes") for p in self.paths if os.stat(p).st_size == 0]
        for class_name in self.classes:
            class_dir = self.folder / class_name
            for parent, _, names in os.walk(class_dir, followlinks=True):
                bad += [(os.path.join(parent, n), "not an image file") for n in sorted(names)
                        if not n.startswith(".") and not n.lower().endswith(IMG_EXTENSIONS)]
        return bad
