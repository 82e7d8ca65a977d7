"""ImageNet-layout image folders: ``root/{train,val|test}/<class>/<image>``.

Images stay on disk and are decoded lazily as 8-bit RGB ``PIL.Image`` objects (:func:`load_rgb`:
grayscale, palette, CMYK, RGBA and 16-bit files included); the transform
(``multi_view_transform`` / ``eval_transform``) crops them to ``data.image_size``.

A file that cannot be decoded (corrupt, truncated, empty, not an image) follows
``data.on_bad_file``: ``error`` stops with :class:`BadImageFile` naming it; ``skip`` serves the
next readable image of the split in its place (deterministically: the next index) and marks the
file in a shared-memory byte mask, so DataLoader worker processes and later epochs share what
was found and :meth:`ImageFolderDataset.bad_file_mask` counts each file once.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from hirl_ray.config import ON_BAD_FILE, ConfigError, RunStopped
from hirl_ray.data.base import HierDataset
from hirl_ray.logs import get_logger

log = get_logger(__name__)

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


class BadImageFile(RunStopped):
    """An image file could not be decoded and ``data.on_bad_file`` is ``error``."""


#: Modes holding 16-bit samples (PNG/TIFF grey); "I" is 32-bit but 16-bit files open as it too.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: Modes with an alpha channel, composited over white (as a viewer shows them), not dropped.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB with what it shows kept.

    ``Image.convert("RGB")`` clips 16-bit values at 255 (a white image) and drops alpha (the
    colour under transparent pixels, often black or junk, shows). Here 16-bit samples are scaled
    by 255/65535, floats in [0, 1] by 255, and alpha is composited over white; every other mode
    (L, 1, P, CMYK, YCbCr, …) converts as usual.
    """
    if img.mode in _WIDE_MODES or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        elif img.mode != "I" or (a.size and a.max() > 255):
            a = a / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str, max_reduction: Callable[[int, int], int] | None = None) -> Image.Image:
    """Decode the whole file now (a truncated one fails here, not in a transform); 8-bit RGB.

    ``max_reduction(width, height)``: how many times smaller per side (1, 2, 4, 8) the caller's
    transform can take the image without a change (``MultiViewTransform.max_reduction``); a JPEG
    is then decoded at that scale by libjpeg's DCT scaling (``Image.draft``), which skips most
    of the decoding work of a large photo. Other formats decode in full.
    """
    img = Image.open(path)  # by name: Pillow closes the file once the pixels are loaded
    try:
        if max_reduction is not None and img.format == "JPEG":
            k = max_reduction(*img.size)
            if k > 1:  # draft gives the largest DCT scale whose size is >= the one asked
                img.draft(img.mode, (img.width // k, img.height // k))
        img.load()
    except BaseException:
        img.close()
        raise
    return to_rgb(img)


class ImageFiles(HierDataset):
    """Images in files, one class label each; decoded when read (:meth:`read`).

    The shared part of a local :class:`ImageFolderDataset` and an ``s3://`` image folder read
    object by object (:class:`~hirl_ray.data.s3.S3ImageFiles`, the Ray Data path): the
    ``data.on_bad_file`` policy and the mask of files found unreadable.

    Args:
        paths: one file path or URI per sample, in index order.
        labels: the class index of each sample.
        classes: class names; ``labels`` index into them.
        root: the dataset root (for messages).
        on_bad_file: ``data.on_bad_file``.
    """

    def __init__(self, paths: list[str], labels: list[int], classes: list[str],
                 root: str | Path, on_bad_file: str = "error") -> None:
        if on_bad_file not in ON_BAD_FILE:
            raise ConfigError(f"data.on_bad_file must be one of {', '.join(ON_BAD_FILE)}, "
                              f"got {on_bad_file!r}")
        self.root = root
        self.classes: list[str] = list(classes)
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1, 1)
        self.level_names = LEVEL_NAMES
        self.on_bad_file = on_bad_file
        # One byte per file, in shared memory: DataLoader worker processes (forked or spawned)
        # write the same bytes, so the parent process sees what they found.
        self._bad = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()

    def read(self, path: str, max_reduction: Callable[[int, int], int] | None = None
             ) -> Image.Image:
        """Decode one file (a local path here; subclasses read other stores), a JPEG at
        reduced size where allowed (:func:`load_rgb`)."""
        return load_rgb(path, max_reduction)

    def load(self, i: int, max_reduction: Callable[[int, int], int] | None = None) -> Image.Image:
        """:meth:`image`, a JPEG decoded at reduced size where allowed (:func:`load_rgb`)."""
        return self.image(i, max_reduction)

    def image(self, i: int, max_reduction: Callable[[int, int], int] | None = None
              ) -> Image.Image:
        """Sample ``i`` as RGB; an unreadable file raises or is replaced (``on_bad_file``)."""
        n = len(self.paths)
        for j in (i + step for step in range(n)):
            j %= n
            if self._bad[j]:
                continue
            try:
                return self.read(self.paths[j], max_reduction)
            # Whatever a decoder raises on a damaged file (OSError, SyntaxError, struct.error,
            # DecompressionBombError, …) means this file is bad.
            except Exception as e:  # noqa: BLE001
                why = f"{type(e).__name__}: {e}"
                if self.on_bad_file == "error":
                    raise BadImageFile(
                        f"cannot read image {self.paths[j]} ({why}); replace or delete the "
                        "file, or set data.on_bad_file=skip") from None
                self._bad[j] = 1
                log.warning("skipping unreadable image %s (%s); data.on_bad_file=skip",
                            self.paths[j], why)
        raise BadImageFile(f"data.root={self.root}: no image of the split could be read "
                           "(every file failed to decode); check the files")

    def bad_file_mask(self) -> torch.Tensor:
        """``(N,)`` uint8: 1 for every file found unreadable and skipped so far."""
        return self._bad

    def skipped_files(self) -> list[str]:
        """Paths of the files skipped so far (``data.on_bad_file=skip``)."""
        return [self.paths[j] for j in torch.nonzero(self._bad).flatten().tolist()]


class ImageFolderDataset(ImageFiles):
    """One split of an image folder; labels are (N, 1) class indices.

    Class indices come from the *train* folder's sorted class names (when it exists), so the
    train and test splits agree even if the test split lacks a class.

    Args:
        root: the dataset root holding the split folders.
        split: ``"train"`` or ``"test"`` (read from ``val/`` or ``test/``).
        on_bad_file: ``data.on_bad_file``: ``"error"`` or ``"skip"`` (see the module docstring).
    """

    def __init__(self, root: str | Path, split: str, on_bad_file: str = "error") -> None:
        if on_bad_file not in ON_BAD_FILE:
            raise ConfigError(f"data.on_bad_file must be one of {', '.join(ON_BAD_FILE)}, "
                              f"got {on_bad_file!r}")
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
        super().__init__([p for p, _ in samples], [t for _, t in samples], classes, root,
                         on_bad_file)

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
