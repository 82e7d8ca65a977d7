"""Augmentations for SSL pretraining and the deterministic evaluation transform.

Both accept a uint8 CHW tensor (in-memory datasets) or a PIL image (imagefolder) and return
plain float tensors normalised with ImageNet statistics. They are classes, not lambdas, so
they pickle into DataLoader worker processes and Ray Train workers. A method chooses its
training views with :class:`MultiViewTransform` (one pipeline per view, ``SSLMethod.transform``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Standard "resize to 256, crop 224" ratio used by ImageNet evaluation protocols.
CROP_RATIO = 0.875


def _to_rgb_image(image: Any) -> torch.Tensor:
    """PIL image or (C, H, W)/(H, W) tensor -> uint8 3-channel tv_tensors.Image."""
    out = v2.functional.to_image(image)  # PIL/ndarray/tensor -> Image; no copy for tensors
    if out.shape[-3] == 1:  # grayscale: replicate so every backbone sees 3 channels
        out = out.repeat(3, 1, 1)
    return out


def gaussian_kernel1d(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """``(B, kernel_size)`` Gaussian weights for ``B`` sigmas, as torchvision builds its kernel
    (``exp(-x²/2σ²)`` at integer offsets, normalised; the 2-D kernel is the outer product)."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, kernel_size, dtype=sigma.dtype, device=sigma.device)
    k = torch.softmax(-(x / sigma[:, None]).pow(2), dim=1)
    # A small sigma (0.1) gives tail weights of 1e-40 and below: subnormal floats, which x86
    # CPUs multiply ~100x slower (the blur took 70 ms per 224-px view). Below 1e-20 a weight
    # moves no pixel by 1e-17, so it is set to 0.
    return k.masked_fill(k < 1e-20, 0.0)


def separable_blur(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Blur float ``(B, C, H, W)`` with a 1-D kernel per image (``weights``: ``(B, k)``, or
    ``(1, k)`` for all), rows then columns, reflect-padded as ``v2.functional.gaussian_blur``."""
    b, c, h, w = x.shape
    k = weights.shape[1]
    y = F.pad(x, [k // 2] * 4, mode="reflect")
    if weights.shape[0] == 1:  # one kernel: a plain 1-channel conv (2x faster than grouped on CPU)
        y = y.reshape(b * c, 1, h + k - 1, w + k - 1)
        wk = weights.to(x.dtype)
        y = F.conv2d(F.conv2d(y, wk.view(1, 1, 1, k)), wk.view(1, 1, k, 1))
        return y.view(b, c, h, w)
    wk = weights.to(x.dtype).repeat_interleave(c, 0)  # (B*C, k): one filter per channel
    y = y.reshape(1, b * c, h + k - 1, w + k - 1)
    y = F.conv2d(y, wk.view(b * c, 1, 1, k), groups=b * c)
    y = F.conv2d(y, wk.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w)


class SeparableGaussianBlur(v2.GaussianBlur):
    """``v2.GaussianBlur`` with the same kernel applied as two 1-D passes.

    torchvision convolves with the full k×k kernel (``functional/_misc.py``): at 224 px the
    SimCLR kernel is 23×23, 529 multiply-adds per pixel, and with a small sigma its tails are
    subnormal floats (see :func:`gaussian_kernel1d`): the blur took ~50 ms of a ~60 ms view on
    one core (``experiments/bench/bench_pipeline.py``). The Gaussian is separable (its 2-D kernel
    is the outer product of the 1-D one), so a row pass then a column pass gives the same image
    up to float rounding for 2k instead of k² multiply-adds. Same parameters and the same random
    draw (``make_params``) as the class it replaces.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, torch.Tensor) or self.kernel_size[0] != self.kernel_size[1]:
            return super().transform(inpt, params)
        x = inpt.as_subclass(torch.Tensor)
        dtype, shape = x.dtype, x.shape
        xf = x.reshape(-1, *shape[-3:]).float()
        sigma = torch.tensor([params["sigma"][0]])
        out = separable_blur(xf, gaussian_kernel1d(self.kernel_size[0], sigma)).reshape(shape)
        if not dtype.is_floating_point:
            out = out.round_().to(dtype)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def simclr_view(image_size: int, strength: float = 1.0,
                scale: tuple[float, float] = (0.2, 1.0), blur: float | None = None,
                solarize: float = 0.0,
                jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)) -> v2.Compose:
    """One SimCLR/MoCo v2 view pipeline: uint8 ``Image`` -> normalised float ``(3, S, S)``.

    RandomResizedCrop with ``scale`` (MoCo v2: (0.2, 1)), horizontal flip,
    ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with p=0.2 (Chen et al. 2020, App. A),
    and Gaussian blur (p=0.5) only when ``image_size >= 96`` (blur destroys small images;
    solo-learn and lightly also drop it for CIFAR-sized inputs).

    Args:
        image_size: Output side length S.
        strength: Scales the colour-jitter strengths (1.0 = the papers' values).
        scale: Area range of the random crop (e.g. ``(0.05, 0.4)`` for DINO's local crops).
        blur: Probability of the Gaussian blur (``None``: 0.5, SimCLR's); never below 96 px.
        solarize: Probability of solarisation (BYOL's second view: 0.2).
        jitter: Colour-jitter brightness, contrast, saturation, hue (before ``strength``;
            BYOL/DINO/MoCo v3: (0.4, 0.4, 0.2, 0.1)).
    """
    if image_size <= 0 or strength < 0:
        raise ValueError(f"need image_size > 0, strength >= 0; got {image_size}, {strength}")
    s = strength
    b, c, sat, hue = jitter
    ops: list[Any] = [
        v2.RandomResizedCrop(image_size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(b * s, c * s, sat * s, min(0.5, hue * s))], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    blur = 0.5 if blur is None else blur
    if image_size >= 96 and blur > 0:
        kernel = max(3, int(0.1 * image_size) // 2 * 2 + 1)  # ~10% of the side, odd
        ops.append(v2.RandomApply([SeparableGaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur))
    if solarize > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=solarize))  # on uint8: pixels >= 128
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


class MultiViewTransform:
    """A list of per-view pipelines: image -> one view per pipeline, in order.

    lightly's ``MultiViewTransform``: any number of views, each with its own augmentations and
    resolution (e.g. DINO's 2 global 224-px crops plus 6 local 96-px crops). The image is turned
    into a uint8 3-channel ``tv_tensors.Image`` once; each pipeline receives it and must return a
    ``(3, H, W)`` tensor. Random draws happen pipeline by pipeline, in list order. A batch of
    views collates (``default_collate``) into a list of ``(B, 3, H_i, W_i)`` tensors.

    Args:
        transforms: One picklable callable per view (it ships to DataLoader workers and Ray).
    """

    def __init__(self, transforms: Sequence[Callable[[Any], torch.Tensor]]) -> None:
        self.transforms = list(transforms)
        if not self.transforms:
            raise ValueError("MultiViewTransform needs at least one view pipeline")

    @property
    def num_views(self) -> int:
        """Views produced per image."""
        return len(self.transforms)

    def max_reduction(self, width: int, height: int) -> int:
        """How much smaller (1, 2, 4 or 8 per side) a ``width`` x ``height`` JPEG may be decoded
        without changing any view (used with ``Image.draft``, :func:`~hirl_ray.data.folder.
        load_rgb`): the smallest over the pipelines of :func:`pipeline_reduction`."""
        return min(pipeline_reduction(t, width, height) for t in self.transforms)

    def __call__(self, image: Any) -> list[torch.Tensor]:
        img = _to_rgb_image(image)
        # as_subclass: plain tensors collate and serialise like any other tensor.
        return [t(img).as_subclass(torch.Tensor) for t in self.transforms]


#: Ops that may come before the random-resized-crop of a pipeline that is decoded at reduced size:
#: they act per pixel or mirror, so they commute with the reduction (colour jitter's contrast
#: uses the image mean, which the reduction keeps).
BEFORE_CROP_OK = (v2.RandomHorizontalFlip, v2.ColorJitter, v2.RandomGrayscale)


def pipeline_reduction(pipeline: Any, width: int, height: int) -> int:
    """Largest power of two ``k <= 8`` such that decoding at ``1/k`` of the size changes no view
    of ``pipeline`` but for resampling. Its random-resized-crop draws area and aspect ratio
    relative to the image, so the crop distribution is the same at any size; ``k`` is chosen
    so that every crop it can draw still spans at least ``size`` source pixels per side: each
    view is then a downscale either way, and none is upsampled that was not before.

    The smallest crop side of ``RandomResizedCrop(size, scale, ratio)`` on a ``W x H`` image is
    ``sqrt(W*H * scale_min * min(ratio_min, 1/ratio_max))`` (its central fallback crops are
    larger). A pipeline this cannot reason about (anything but a ``v2.Compose`` whose geometry is
    one random-resized-crop after flips/colour ops) gets 1: no reduction.
    """
    ops = getattr(pipeline, "transforms", None)
    if not isinstance(pipeline, v2.Compose) or not ops:
        return 1
    for op in ops:
        inner = op.transforms if isinstance(op, v2.RandomApply) else [op]
        if isinstance(op, v2.RandomResizedCrop):
            ratio = min(op.ratio[0], 1.0 / op.ratio[1])
            smallest = math.sqrt(width * height * op.scale[0] * ratio)
            k = 8
            while k > 1 and smallest / k < max(op.size):
                k //= 2
            return k
        if not all(isinstance(t, BEFORE_CROP_OK) for t in inner):
            return 1
    return 1


class MultiView(MultiViewTransform):
    """The same SimCLR/MoCo v2 pipeline (:func:`simclr_view`) ``num_views`` times."""

    def __init__(self, image_size: int, num_views: int = 2, strength: float = 1.0) -> None:
        if num_views <= 0:
            raise ValueError(f"need num_views > 0, got {num_views}")
        self.pipeline = simclr_view(image_size, strength)
        super().__init__([self.pipeline] * num_views)


#: View styles of :class:`MultiCrop`: ``simclr`` (every view alike, SimCLR/MoCo v2/SwAV) or
#: ``byol`` (BYOL's asymmetric pair: DINO, iBOT and MoCo v3's official pipelines).
AUGMENTS = ("simclr", "byol")
#: Colour jitter of the BYOL-style views (brightness, contrast, saturation, hue).
BYOL_JITTER = (0.4, 0.4, 0.2, 0.1)


class MultiCrop(MultiViewTransform):
    """Multi-crop (Caron et al. 2020, SwAV Sec. 3.2): global crops, then smaller local crops.

    ``num_global`` views at ``global_size`` with crop area in ``global_scale``, then
    ``num_local`` views at ``local_size`` with area in ``local_scale`` (SwAV: 2×224 px from
    (0.14, 1) and 6×96 px from (0.05, 0.14); DINO: (0.4, 1) / (0.05, 0.4)), each with the
    SimCLR colour augmentations (:func:`simclr_view`). Views come in that order, so the global
    crops are ``views[:num_global]`` and each resolution is one backbone pass
    (:func:`~hirl_ray.models.forward_by_resolution`). ``augment="byol"`` makes the global crops
    BYOL's asymmetric pair (blur 1.0 / 0.1 + solarisation 0.2, jitter (0.4, 0.4, 0.2, 0.1)) and
    the local crops blurred with p = 0.5, as DINO's ``DataAugmentationDINO``.
    """

    def __init__(self, global_size: int, local_size: int, num_global: int = 2,
                 num_local: int = 6, global_scale: tuple[float, float] = (0.14, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.14), strength: float = 1.0,
                 augment: str = "simclr") -> None:
        if num_global < 1 or num_local < 0:
            raise ValueError(f"multi-crop needs >= 1 global and >= 0 local crops, got "
                             f"{num_global} and {num_local}")
        for name, (lo, hi) in (("global", global_scale), ("local", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"multi-crop {name} crop scale must satisfy 0 < min <= max "
                                 f"<= 1, got ({lo}, {hi})")
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        self.num_global, self.num_local = num_global, num_local
        gs, ls = tuple(global_scale), tuple(local_scale)
        if augment == "byol":
            # BYOL's asymmetric pair (Grill et al. 2020, Table 6), as DINO's and MoCo v3's
            # official pipelines: view 1 always blurred, view 2 rarely blurred but solarised.
            j = BYOL_JITTER
            globals_ = [simclr_view(global_size, strength, gs, blur=1.0, jitter=j),
                        simclr_view(global_size, strength, gs, blur=0.1, solarize=0.2, jitter=j)]
            globals_ = [globals_[i % 2] for i in range(num_global)]
            local = simclr_view(local_size, strength, ls, blur=0.5, jitter=j)
        else:
            globals_ = [simclr_view(global_size, strength, scale=gs)] * num_global
            local = simclr_view(local_size, strength, scale=ls)
        super().__init__(globals_ + [local] * num_local)


class EvalTransform:
    """Deterministic transform for feature extraction (kNN, linear probe, clustering pass).

    Images bigger than ``image_size`` are resized (short side) to ``image_size / 0.875`` and
    center-cropped, the usual ImageNet protocol; smaller or equal ones are resized to
    ``image_size`` (short side) and center-cropped, which is a plain resize for square inputs.
    """

    def __init__(self, image_size: int) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}")
        self.image_size = image_size
        self.normalise = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
        )

    def max_reduction(self, width: int, height: int) -> int:
        """JPEG reduction (``Image.draft``) that keeps the short side >= the resize target."""
        target = int(round(self.image_size / CROP_RATIO))
        k = 8
        while k > 1 and min(width, height) / k < target:
            k //= 2
        return k

    def __call__(self, image: Any) -> torch.Tensor:
        img = _to_rgb_image(image)
        s = self.image_size
        if min(img.shape[-2:]) > s:
            img = v2.functional.resize(img, [int(round(s / CROP_RATIO))], antialias=True)
        elif tuple(img.shape[-2:]) != (s, s):
            img = v2.functional.resize(img, [s], antialias=True)
        img = v2.functional.center_crop(img, [s, s])
        return self.normalise(img).as_subclass(torch.Tensor)


def multi_view_transform(image_size: int, num_views: int = 2, strength: float = 1.0) -> MultiView:
    """SimCLR/MoCo v2 augmentations producing ``num_views`` views per image.

    Args:
        image_size: output side length S.
        num_views: views per image (2 for SimCLR/MoCo/BYOL/SimSiam).
        strength: scales the colour-jitter strengths (1.0 = the papers' values).

    Returns:
        A picklable callable: image (uint8 tensor or PIL) -> list of float (3, S, S) tensors.
    """
    return MultiView(image_size, num_views, strength)


def multi_crop_transform(global_size: int, local_size: int, num_global: int = 2,
                         num_local: int = 6, global_scale: tuple[float, float] = (0.14, 1.0),
                         local_scale: tuple[float, float] = (0.05, 0.14),
                         strength: float = 1.0, augment: str = "simclr") -> MultiCrop:
    """Global + local crops per image (:class:`MultiCrop`): ``num_global + num_local`` views."""
    return MultiCrop(global_size, local_size, num_global, num_local, global_scale, local_scale,
                     strength, augment)


def eval_transform(image_size: int) -> EvalTransform:
    """Evaluation preprocessing: image (PIL or uint8 tensor) -> normalised float (3, S, S).

    This is what ``load_backbone`` returns as ``preprocess``.
    """
    return EvalTransform(image_size)
