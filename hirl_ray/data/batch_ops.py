"""Batched image augmentations with per-sample random parameters, on any device.

The ops of the methods' view pipelines (:mod:`hirl_ray.data.transforms`) restated for a batch
``x``: float ``(B, 3, H, W)`` in ``[0, 1]``, every sample drawing its own parameters, as the
per-image torchvision v2 pipeline does. A batch-wide draw (one crop box or one jitter factor for
all images, as ``v2`` transforms give when called on a batch) would correlate the views of
different images and is not the same distribution. Formulas follow torchvision's
(``v2/functional/_color.py``, ``_misc.py``, ``_geometry.py``); each op draws from the given
``torch.Generator`` on ``x``'s device, so nothing waits on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align

# torchvision's own HSV conversion (batched over leading dims): the same hue arithmetic as
# ``v2.functional.adjust_hue``; tests/test_device_views.py compares the two.
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from hirl_ray.data.transforms import gaussian_kernel1d, separable_blur

#: ITU-R 601-2 luma, as ``v2.functional.rgb_to_grayscale``.
GRAY = (0.2989, 0.587, 0.114)


def uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> Tensor:
    """``(n,)`` floats uniform in ``[low, high)``."""
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def coin(n: int, p: float, g: torch.Generator, device: torch.device) -> Tensor:
    """``(n,)`` booleans, each true with probability ``p``."""
    return torch.rand(n, generator=g, device=device) < p


def apply_where(mask: Tensor, op: Callable[..., Tensor], x: Tensor, *params: Tensor) -> Tensor:
    """``op(x, *params)`` for the images where ``mask`` is true, ``x`` elsewhere.

    On a GPU the op runs on the whole batch and ``torch.where`` picks (no host synchronisation,
    which selecting rows would need); on the CPU only the selected rows are computed.
    """
    if x.device.type != "cpu":
        return torch.where(mask.view(-1, 1, 1, 1), op(x, *params), x)
    rows = mask.nonzero().squeeze(1)
    if rows.numel() == 0:
        return x
    out = x.clone()
    out[rows] = op(x[rows], *(p[rows] for p in params))
    return out


def crop_boxes(sizes: Tensor, scale: Sequence[float], ratio: Sequence[float],
               g: torch.Generator, tries: int = 10) -> Tensor:
    """``RandomResizedCrop.make_params`` for every image at once: ``(B, 4)`` float boxes
    ``(left, top, width, height)`` in pixels of each image's own ``sizes[b] = (H, W)``.

    Up to ``tries`` draws of area fraction ``U(scale)`` and log-aspect ``U(log ratio)`` per
    image; the first whose rounded box fits is kept, else torchvision's central fallback crop.
    """
    dev = sizes.device
    hw = sizes.to(torch.float64)
    height, width = hw[:, :1], hw[:, 1:]
    b = sizes.shape[0]
    area = height * width * (torch.rand(b, tries, generator=g, device=dev, dtype=torch.float64)
                             * (scale[1] - scale[0]) + scale[0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.rand(b, tries, generator=g, device=dev, dtype=torch.float64)
                       * (hi - lo) + lo)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)  # first fitting try (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    height, width = height.squeeze(1), width.squeeze(1)
    found = fits.any(1)
    # Fallback (no try fitted): the largest central crop with the aspect ratio clamped to ratio.
    in_ratio = width / height
    fw = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fh = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(b, 2, generator=g, device=dev, dtype=torch.float64)
    top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)), torch.floor((width - w) / 2))
    return torch.stack([left, top, w, h], 1)


def resized_crop(x: Tensor, boxes: Tensor, sizes: Tensor, content: Tensor,
                 size: Sequence[int]) -> Tensor:
    """Crop each image's box and resize it to ``size``, in one ``roi_align`` call.

    ``boxes`` are in pixels of each image's ``sizes`` (H, W); in ``x`` the image fills the
    top-left ``content`` (h, w) pixels (the device path decodes into a padded square, shrunk
    when larger), so boxes are scaled per axis by ``content / sizes``: the same region of the
    image. ``aligned=True`` puts pixel centres at +0.5 (as a resize does) and the adaptive
    sampling averages ``ceil(box / size)`` points per output pixel, an area filter when
    shrinking (the CPU path's ``antialias=True``) and bilinear when enlarging.
    """
    scale = content.to(torch.float64) / sizes.to(torch.float64)  # (B, 2): y, x
    left, top, w, h = boxes.unbind(1)
    sy, sx = scale.unbind(1)
    rois = torch.stack([torch.arange(len(x), device=x.device, dtype=torch.float64),
                        left * sx, top * sy, (left + w) * sx, (top + h) * sy], 1)
    return roi_align(x, rois.to(x.dtype), output_size=tuple(size), spatial_scale=1.0,
                     sampling_ratio=-1, aligned=True)


def content_mask(x: Tensor, content: Tensor) -> Tensor:
    """``(B, 1, H, W)``: 1 on each image's top-left ``content`` (h, w) pixels, 0 on padding."""
    rows = torch.arange(x.shape[-2], device=x.device).view(1, -1, 1)
    cols = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
    h, w = content[:, 0].view(-1, 1, 1), content[:, 1].view(-1, 1, 1)
    return ((rows < h) & (cols < w)).unsqueeze(1).to(x.dtype)


def grayscale(x: Tensor) -> Tensor:
    """``(B, 1, H, W)`` luma."""
    r, gch, b = x.unbind(1)
    return (r * GRAY[0] + gch * GRAY[1] + b * GRAY[2]).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (x * f + other * (1 - f)).clamp_(0, 1)


def brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def contrast(x: Tensor, f: Tensor, mask: Tensor | None = None) -> Tensor:
    """Blend with the mean luma; with ``mask`` (padded images) the mean of the content."""
    if mask is None:
        return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)
    mean = (grayscale(x) * mask).sum(dim=(1, 2, 3), keepdim=True) / mask.sum(
        dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, f)


def saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, grayscale(x), f)


def hue(x: Tensor, f: Tensor) -> Tensor:
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0] + f.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], 1))


def color_jitter(x: Tensor, ranges: Sequence[tuple[float, float] | None], p: float,
                 g: torch.Generator, mask: Tensor | None = None) -> Tensor:
    """``RandomApply([ColorJitter(...)], p)`` per image: brightness, contrast, saturation, hue
    factors ``U(range)`` (``None``: that op is off) applied in a random order of the four per
    image (``ColorJitter.make_params``'s ``randperm``); an image left out keeps its pixels.
    ``mask``: the content of padded images (before the crop; see :func:`contrast`).

    Each of the 4 positions evaluates every op on the whole batch and keeps it where that image
    has the op there: 16 cheap elementwise passes instead of a host-synchronising gather.
    """
    b, dev = x.shape[0], x.device
    applied = coin(b, p, g, dev)
    order = torch.rand(b, 4, generator=g, device=dev).argsort(1)  # a random permutation each
    ops: list[Callable[..., Tensor]] = [brightness, contrast, saturation, hue]
    factors = [None if r is None else uniform(b, r[0], r[1], g, dev) for r in ranges]
    for pos in range(4):
        for k, (op, f) in enumerate(zip(ops, factors, strict=True)):
            if f is not None:
                extra = (mask,) if k == 1 and mask is not None else ()
                x = apply_where(applied & (order[:, pos] == k), op, x, f, *extra)
    return x


def random_grayscale(x: Tensor, p: float, g: torch.Generator) -> Tensor:
    return apply_where(coin(x.shape[0], p, g, x.device), lambda y: grayscale(y).expand_as(y), x)


def random_flip(x: Tensor, p: float, g: torch.Generator, content: Tensor | None = None
                ) -> Tensor:
    """Mirror with probability ``p``; with ``content`` (padded images) each image's content
    columns are mirrored in place and the padding repeats the new last column (the old first:
    :class:`~hirl_ray.data.device_views.DecodeFixed` pads by repeating the border)."""
    flip = coin(x.shape[0], p, g, x.device)
    if content is None:
        return apply_where(flip, lambda y: y.flip(-1), x)
    cols = torch.arange(x.shape[-1], device=x.device).view(1, -1)
    w = content[:, 1:2]
    src = torch.where(cols < w, w - 1 - cols, 0)  # (B, W): source column of each column
    return apply_where(flip, lambda y, s: y.gather(-1, s.view(len(y), 1, 1, -1).expand_as(y)),
                       x, src)


def random_blur(x: Tensor, kernel_size: int, sigma: Sequence[float], p: float,
                g: torch.Generator) -> Tensor:
    """``RandomApply([GaussianBlur(k, sigma)], p)``: sigma ``U(sigma)`` per image."""
    b, dev = x.shape[0], x.device
    apply = coin(b, p, g, dev)
    s = uniform(b, sigma[0], sigma[1], g, dev)
    return apply_where(apply, lambda y, sy: separable_blur(y, gaussian_kernel1d(kernel_size, sy)),
                       x, s)


def random_solarize(x: Tensor, threshold: float, p: float, g: torch.Generator) -> Tensor:
    """``RandomSolarize(threshold, p)``; ``threshold`` in ``x``'s [0, 1] units."""
    return apply_where(coin(x.shape[0], p, g, x.device),
                       lambda y: torch.where(y >= threshold, 1.0 - y, y), x)
