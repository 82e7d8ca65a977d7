"""Views made on the training device (``data.augment_on: gpu``).

At ImageNet scale the CPU augmentation of two (or eight, multi-crop) views per image is the
first bottleneck: ``experiments/bench/bench_pipeline.py`` measures a few hundred views per
second per core against thousands of images per second per GPU. With ``augment_on: gpu`` the
loader's workers only decode (:class:`DecodeFixed`: every image to one fixed size, so a batch
collates, plus its original size), the batch goes to the device with the training step's
other inputs, and :class:`DeviceViews` makes the method's views there, batched, with the
method's own pipelines (``SSLMethod.transform``) restated op by op (:mod:`~hirl_ray.data.
batch_ops`) and random parameters drawn per image. The step sees ``(views, index)`` as before.

Crops are drawn in the coordinates of the original image (area fraction and aspect ratio
relative to it, as ``RandomResizedCrop`` does on the CPU path) and mapped into the decoded
square, so squashing an image to a square changes neither the crop distribution nor what a view
shows; only the resolution of the source is capped at :data:`DECODE_SCALE` × the largest view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from hirl_ray.config import ConfigError
from hirl_ray.data import batch_ops as B
from hirl_ray.data.base import TensorHierDataset
from hirl_ray.data.transforms import MultiViewTransform, SeparableGaussianBlur, _to_rgb_image

#: Image files decode to a square of this many times the largest view's side: crops down to a
#: quarter of the image area still come from at least as many pixels as the view has.
DECODE_SCALE = 2


class DecodeFixed:
    """The CPU side of ``augment_on: gpu``: image -> ``[uint8 (3, S, S), int64 (2,) = (H, W)]``.

    ``size``: the common square side, or ``None`` to keep images as they are (in-memory sets,
    whose images share one size). A JPEG decodes at reduced size (``Image.draft``) as long as it
    stays at least ``size`` per side; PIL's resize to the square is antialiased.
    """

    def __init__(self, size: int | None) -> None:
        self.size = size

    def max_reduction(self, width: int, height: int) -> int:
        """Largest 1/2/4/8 reduction that keeps both sides >= ``size``."""
        k = 8
        while self.size is not None and k > 1 and min(width, height) / k < self.size:
            k //= 2
        return k if self.size is not None else 1

    def __call__(self, image: Any) -> list[Tensor]:
        s = self.size
        if isinstance(image, Image.Image):
            hw = (image.height, image.width)
            if s is not None and image.size != (s, s):
                image = image.resize((s, s), Image.Resampling.BILINEAR)
            out = _to_rgb_image(image)
        else:
            out = _to_rgb_image(image)
            hw = tuple(out.shape[-2:])
            if s is not None and hw != (s, s):
                out = v2.functional.resize(out, [s, s], antialias=True)
        return [out.as_subclass(Tensor), torch.tensor(hw, dtype=torch.int64)]


def decode_size(dataset: Any, transform: MultiViewTransform) -> int | None:
    """:class:`DecodeFixed`'s size: ``None`` for an in-memory set (one size already), else
    :data:`DECODE_SCALE` × the largest output side of the method's views."""
    if isinstance(dataset, TensorHierDataset):
        return None
    sides = [max(op.size) for t in transform.transforms for op in getattr(t, "transforms", [])
             if isinstance(op, v2.RandomResizedCrop)]
    return DECODE_SCALE * max(sides, default=224)


Op = Callable[[Tensor, Tensor, torch.Generator], Tensor]


def _jitter_ranges(cj: v2.ColorJitter) -> list[tuple[float, float] | None]:
    return [None if r is None else (float(r[0]), float(r[1]))
            for r in (cj.brightness, cj.contrast, cj.saturation, cj.hue)]


def _batched(op: Any, p: float = 1.0) -> Op | None:
    """The batched restatement of one v2 op (``p``: its RandomApply probability), or None."""
    if isinstance(op, v2.RandomApply):
        if len(op.transforms) != 1:
            return None
        return _batched(op.transforms[0], p * op.p)
    if isinstance(op, v2.RandomResizedCrop):
        size, scale, ratio = list(op.size), op.scale, op.ratio
        return lambda x, hw, g: B.resized_crop(x, B.crop_boxes(hw, scale, ratio, g), hw, size)
    if isinstance(op, v2.RandomHorizontalFlip):
        q = p * op.p
        return lambda x, hw, g: B.random_flip(x, q, g)
    if isinstance(op, v2.ColorJitter):
        ranges = _jitter_ranges(op)
        return lambda x, hw, g: B.color_jitter(x, ranges, p, g)
    if isinstance(op, v2.RandomGrayscale):
        q = p * op.p
        return lambda x, hw, g: B.random_grayscale(x, q, g)
    if isinstance(op, (v2.GaussianBlur, SeparableGaussianBlur)):
        k, sigma = op.kernel_size, op.sigma
        if k[0] != k[1]:
            return None
        return lambda x, hw, g: B.random_blur(x, k[0], sigma, p, g)
    if isinstance(op, v2.RandomSolarize):
        q, t = p * op.p, float(op.threshold) / 255.0  # the CPU path solarises uint8 pixels
        return lambda x, hw, g: B.random_solarize(x, t, q, g)
    if isinstance(op, v2.ToDtype) and p == 1.0:
        return lambda x, hw, g: x  # the batch is float in [0, 1] already
    if isinstance(op, v2.Normalize) and p == 1.0:
        mean, std = torch.tensor(op.mean), torch.tensor(op.std)
        return lambda x, hw, g: (x - mean.to(x.device).view(1, -1, 1, 1)) / std.to(
            x.device).view(1, -1, 1, 1)
    return None


def batched_pipeline(pipeline: Any, where: str = "data.augment_on") -> list[Op]:
    """A method's view pipeline (a ``v2.Compose``) as batched ops; ConfigError if it has an op
    the device path does not restate (the CPU path runs any pipeline)."""
    ops = getattr(pipeline, "transforms", None)
    if not isinstance(pipeline, v2.Compose) or not ops:
        raise ConfigError(f"{where}=gpu needs view pipelines built from torchvision v2 ops "
                          f"(v2.Compose), got {type(pipeline).__name__}; use {where}=cpu")
    out = []
    for op in ops:
        fn = _batched(op)
        if fn is None:
            raise ConfigError(f"{where}=gpu cannot run the view op {op!r} on the device yet; "
                              f"use {where}=cpu")
        out.append(fn)
    if not any(isinstance(op, v2.RandomResizedCrop) for op in ops):
        raise ConfigError(f"{where}=gpu needs a RandomResizedCrop in every view pipeline (it "
                          f"sets the view's size); use {where}=cpu")
    return out


class DeviceViews:
    """The method's views of a decoded batch, made where the batch is (``augment_on: gpu``).

    ``DeviceViews(method.transform(data_cfg), seed)([images, sizes])`` with ``images`` uint8
    ``(B, 3, S, S)`` and ``sizes`` ``(B, 2)`` from :class:`DecodeFixed` returns one normalised
    float ``(B, 3, H_i, W_i)`` tensor per view pipeline, in the pipelines' order; every image
    draws its own crop, flip, jitter, grayscale, blur and solarisation. The random stream is a
    ``torch.Generator`` on the batch's device, seeded once, continued from batch to batch.
    """

    def __init__(self, transform: MultiViewTransform, seed: int) -> None:
        self.pipelines = [batched_pipeline(t) for t in transform.transforms]
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def num_views(self) -> int:
        return len(self.pipelines)

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def __call__(self, batch: Sequence[Tensor]) -> list[Tensor]:
        images, sizes = batch
        if images.dtype != torch.uint8 or images.ndim != 4 or sizes.shape != (len(images), 2):
            raise ValueError("DeviceViews takes [uint8 (B, 3, S, S) images, (B, 2) sizes] from "
                             f"DecodeFixed, got {images.dtype} {tuple(images.shape)} and "
                             f"{tuple(sizes.shape)}")
        g = self.generator(images.device)
        x = images.float().div_(255.0).contiguous()
        views = []
        for ops in self.pipelines:
            v = x
            for op in ops:
                v = op(v, sizes, g)
            views.append(v)
        return views
