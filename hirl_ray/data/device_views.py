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
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2

from hirl_ray.config import ConfigError
from hirl_ray.data import batch_ops as B
from hirl_ray.data.base import TensorHierDataset
from hirl_ray.data.transforms import BEFORE_CROP_OK, MultiViewTransform, _to_rgb_image

#: Image files decode into a square of this many times the largest view's side: an image that
#: fits is copied as it is (no resampling), a larger one shrinks to fit (aspect kept), so crops
#: down to a quarter of the image's area still come from at least as many pixels as the view has.
DECODE_SCALE = 2


class DecodeFixed:
    """The CPU side of ``augment_on: gpu``: image -> ``[uint8 (3, S, S), int64 (4,)]``.

    The image sits in the top-left corner of an edge-padded ``S x S`` square (shrunk to fit,
    aspect kept, when larger: PIL's antialiased resize); the four numbers are its size
    ``(H, W)``, in which crops are drawn, and the size ``(h, w)`` it has in the square.
    ``size=None`` keeps images as they are (in-memory sets share one size). A JPEG decodes at
    reduced size (``Image.draft``) while its longer side stays >= ``size``.
    """

    def __init__(self, size: int | None) -> None:
        self.size = size

    def max_reduction(self, width: int, height: int) -> int:
        """Largest 1/2/4/8 reduction that keeps the longer side >= ``size``."""
        if self.size is None:
            return 1
        k = 8
        while k > 1 and max(width, height) / k < self.size:
            k //= 2
        return k

    def __call__(self, image: Any) -> list[Tensor]:
        s = self.size
        if isinstance(image, Image.Image):
            hw = (image.height, image.width)
            if s is not None and max(hw) > s:
                f = s / max(hw)
                image = image.resize((max(1, round(hw[1] * f)), max(1, round(hw[0] * f))),
                                     Image.Resampling.BILINEAR)
            img = _to_rgb_image(image)
        else:
            img = _to_rgb_image(image)
            hw = tuple(img.shape[-2:])
            if s is not None and max(hw) > s:
                f = s / max(hw)
                img = v2.functional.resize(img, [max(1, round(hw[0] * f)),
                                                 max(1, round(hw[1] * f))], antialias=True)
        img = img.as_subclass(Tensor)
        h, w = img.shape[-2:]
        if s is not None and (h, w) != (s, s):
            # Edge-replicated padding: a crop's bilinear samples next to the content's border
            # read the border pixel, as at an image's own border (zeros would darken the edge).
            canvas = img.new_empty(3, s, s)
            canvas[:, :h, :w] = img
            canvas[:, :h, w:] = img[:, :, w - 1:]
            canvas[:, h:, :] = canvas[:, h - 1:h, :]
            img = canvas
        return [img, torch.tensor([*hw, h, w], dtype=torch.int64)]


def decode_size(dataset: Any, transform: MultiViewTransform) -> int | None:
    """:class:`DecodeFixed`'s size: ``None`` for an in-memory set (one size already), else
    :data:`DECODE_SCALE` × the largest output side of the method's views."""
    if isinstance(dataset, TensorHierDataset):
        return None
    sides = [max(op.size) for t in transform.transforms for op in getattr(t, "transforms", [])
             if isinstance(op, v2.RandomResizedCrop)]
    return DECODE_SCALE * max(sides, default=224)


@dataclass
class Geometry:
    """Where each image is in a batch: ``sizes`` (B, 2) = (H, W), the frame crops are drawn
    in; ``content`` (B, 2) = (h, w), its top-left extent in the tensor (``None`` once cropped:
    the whole tensor); ``mask`` the content as (B, 1, H', W') (``None`` when unpadded)."""

    sizes: Tensor
    content: Tensor | None
    mask: Tensor | None


Op = Callable[[Tensor, Geometry, torch.Generator], Tensor]


def _jitter_ranges(cj: v2.ColorJitter) -> list[tuple[float, float] | None]:
    return [None if r is None else (float(r[0]), float(r[1]))
            for r in (cj.brightness, cj.contrast, cj.saturation, cj.hue)]


def _batched(op: Any, p: float = 1.0) -> Op | None:
    """The batched restatement of one v2 op (``p``: its RandomApply probability), or None.

    Ops before the crop see padded images: flips mirror each image's content in place (the
    padding then repeats the new border), colour jitter takes the content's mean for contrast
    (``Geometry``); the other per-pixel ops keep the padding a copy of the border as they are.
    """
    if isinstance(op, v2.RandomApply):
        if len(op.transforms) != 1:
            return None
        return _batched(op.transforms[0], p * op.p)
    if isinstance(op, v2.RandomResizedCrop):
        size, scale, ratio = list(op.size), op.scale, op.ratio

        def crop(x: Tensor, geo: Geometry, g: torch.Generator) -> Tensor:
            content = geo.content if geo.content is not None else geo.sizes
            out = B.resized_crop(x, B.crop_boxes(geo.sizes, scale, ratio, g), geo.sizes,
                                 content, size)
            geo.content = geo.mask = None  # from here on every pixel is the view's
            return out
        return crop
    if isinstance(op, v2.RandomHorizontalFlip):
        q = p * op.p
        return lambda x, geo, g: B.random_flip(x, q, g, geo.content)
    if isinstance(op, v2.ColorJitter):
        ranges = _jitter_ranges(op)
        return lambda x, geo, g: B.color_jitter(x, ranges, p, g, geo.mask)
    if isinstance(op, v2.RandomGrayscale):
        q = p * op.p
        return lambda x, geo, g: B.random_grayscale(x, q, g)
    if isinstance(op, v2.GaussianBlur) and op.kernel_size[0] == op.kernel_size[1]:
        k, sigma = op.kernel_size[0], op.sigma
        return lambda x, geo, g: B.random_blur(x, k, sigma, p, g)
    if isinstance(op, v2.RandomSolarize):
        q, t = p * op.p, float(op.threshold) / 255.0  # the CPU path solarises uint8 pixels
        return lambda x, geo, g: B.random_solarize(x, t, q, g)
    if isinstance(op, v2.ToDtype) and p == 1.0:
        return lambda x, geo, g: x  # the batch is float in [0, 1] already
    if isinstance(op, v2.Normalize) and p == 1.0:
        mean, std = torch.tensor(op.mean), torch.tensor(op.std)
        return lambda x, geo, g: (x - mean.to(x.device).view(1, -1, 1, 1)) / std.to(
            x.device).view(1, -1, 1, 1)
    return None


def batched_pipeline(pipeline: Any, where: str = "data.augment_on") -> list[Op]:
    """A method's view pipeline (a ``v2.Compose``) as batched ops; ConfigError if it has an op
    the device path does not restate (the CPU path runs any pipeline)."""
    ops = getattr(pipeline, "transforms", None)
    if not isinstance(pipeline, v2.Compose) or not ops:
        raise ConfigError(f"{where}=gpu needs view pipelines built from torchvision v2 ops "
                          f"(v2.Compose), got {type(pipeline).__name__}; use {where}=cpu")
    out, cropped = [], False
    for op in ops:
        inner = op.transforms if isinstance(op, v2.RandomApply) else [op]
        if not cropped and not all(isinstance(t, BEFORE_CROP_OK) for t in inner) and not \
                isinstance(op, v2.RandomResizedCrop):
            raise ConfigError(f"{where}=gpu runs only flips and colour ops before the "
                              f"RandomResizedCrop of a view, got {op!r}; use {where}=cpu")
        cropped = cropped or isinstance(op, v2.RandomResizedCrop)
        fn = _batched(op)
        if fn is None:
            raise ConfigError(f"{where}=gpu cannot run the view op {op!r} on the device yet; "
                              f"use {where}=cpu")
        out.append(fn)
    if not any(isinstance(op, v2.RandomResizedCrop) for op in ops):
        raise ConfigError(f"{where}=gpu needs a RandomResizedCrop in every view pipeline (it "
                          f"sets the view's size); use {where}=cpu")
    return out


def check_method_views(method_cls: Any, method_cfg: Any, data_cfg: Any) -> int:
    """Refuse, before Ray starts, a method whose views the device path cannot make.

    Calls the method class's ``transform(data_cfg)`` with only its config (the transforms of
    the built-in methods read nothing else, so no network is built on the driver) and restates
    each pipeline; returns the number of views. A transform that needs the built method is
    checked when the workers build it (returns 0).
    """
    try:
        transform = method_cls.transform(SimpleNamespace(cfg=method_cfg), data_cfg)
    except AttributeError:
        return 0
    for pipeline in transform.transforms:
        batched_pipeline(pipeline)
    return len(transform.transforms)


class DeviceViews:
    """The method's views of a decoded batch, made where the batch is (``augment_on: gpu``).

    ``DeviceViews(method.transform(data_cfg), seed)([images, geometry])`` with ``images`` uint8
    ``(B, 3, S, S)`` and ``geometry`` ``(B, 4)`` from :class:`DecodeFixed` returns one normalised
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
        images, geometry = batch
        if images.dtype != torch.uint8 or images.ndim != 4 or geometry.shape != (len(images), 4):
            raise ValueError("DeviceViews takes [uint8 (B, 3, S, S) images, (B, 4) geometry] "
                             f"from DecodeFixed, got {images.dtype} {tuple(images.shape)} and "
                             f"{tuple(geometry.shape)}")
        g = self.generator(images.device)
        x = images.float().div_(255.0).contiguous()
        sizes, content = geometry[:, :2], geometry[:, 2:]
        # Padded images need masked ops before the crop; on a GPU assume so (asking would wait
        # for the device), on the CPU look.
        full = torch.tensor(images.shape[-2:], device=content.device)
        padded = x.device.type != "cpu" or bool((content != full).any())
        mask = B.content_mask(x, content) if padded else None
        views = []
        for ops in self.pipelines:
            geo = Geometry(sizes, content if padded else None, mask)
            v = x
            for op in ops:
                v = op(v, geo, g)
            views.append(v)
        return views
