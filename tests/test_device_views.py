"""``data.augment_on=gpu`` (issue 15): the batched device-side views, run here on CPU tensors,
against the CPU path (torchvision v2, one image at a time); the cheap CPU fixes (separable blur,
JPEG draft) change no view."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from hirl_ray.config import ConfigError, load_config
from hirl_ray.data import ViewDataset, build_dataset
from hirl_ray.data import batch_ops as B
from hirl_ray.data.device_views import DecodeFixed, DeviceViews, batched_pipeline
from hirl_ray.data.folder import ImageFolderDataset, load_rgb
from hirl_ray.data.transforms import (
    MultiViewTransform,
    SeparableGaussianBlur,
    gaussian_kernel1d,
    multi_crop_transform,
    pipeline_reduction,
    separable_blur,
    simclr_view,
)

torch.set_num_threads(1)


def _smooth(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, h, w) smooth random images (upsampled noise): resampling barely matters."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, h // 8 + 2, w // 8 + 2, generator=g)
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear")
    return (big * 255).round().to(torch.uint8)


def _cpu_views(pipeline, images: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.stack([pipeline(tv_tensors.Image(im)).as_subclass(torch.Tensor)
                        for im in images])


def _device_views(pipeline, images: torch.Tensor, seed: int) -> torch.Tensor:
    dec = DecodeFixed(None)
    batch = [torch.stack(v) for v in zip(*[dec(im) for im in images], strict=True)]
    return DeviceViews(MultiViewTransform([pipeline]), seed)(batch)[0]


# ---- the batched ops are torchvision's formulas, per sample ----------------------------------

def test_colour_ops_match_torchvision_per_sample():
    x = torch.rand(6, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    f = torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4, 0.7])
    h = torch.tensor([-0.1, -0.05, 0.0, 0.03, 0.1, 0.5])
    F = v2.functional
    for ours, theirs, factors in ((B.brightness, F.adjust_brightness, f),
                                  (B.contrast, F.adjust_contrast, f),
                                  (B.saturation, F.adjust_saturation, f),
                                  (B.hue, F.adjust_hue, h)):
        ref = torch.stack([theirs(x[i], float(factors[i])) for i in range(6)])
        assert torch.allclose(ours(x.clone(), factors), ref, atol=1e-5), ours.__name__
    gray = F.rgb_to_grayscale(x, num_output_channels=1)
    assert torch.allclose(B.grayscale(x), gray, atol=1e-6)


def test_blur_per_sample_and_separable_blur_match_torchvision():
    x = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    ours = separable_blur(x, gaussian_kernel1d(9, sigma))
    ref = torch.stack([v2.functional.gaussian_blur(x[i], [9, 9], [float(sigma[i])] * 2)
                       for i in range(4)])
    assert torch.allclose(ours, ref, atol=1e-5)
    # The CPU path's drop-in: same random draw, same uint8 image up to a rare rounding tie.
    img = tv_tensors.Image(_smooth(1, 224, 224)[0])
    for seed in range(3):
        torch.manual_seed(seed)
        a = v2.GaussianBlur(23, (0.1, 2.0))(img)
        torch.manual_seed(seed)
        b = SeparableGaussianBlur(23, (0.1, 2.0))(img)
        assert isinstance(b, tv_tensors.Image) and b.dtype == torch.uint8
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_crop_boxes_follow_torchvision_distribution():
    n, g = 4000, torch.Generator().manual_seed(0)
    for (h, w), scale in (((350, 400), (0.08, 1.0)), ((60, 600), (0.2, 1.0))):
        rrc = v2.RandomResizedCrop(32, scale=scale)
        torch.manual_seed(0)
        ref = [rrc.make_params([torch.zeros(3, h, w)]) for _ in range(n)]
        ref_area = torch.tensor([p["height"] * p["width"] / (h * w) for p in ref])
        ref_logr = torch.tensor([math.log(p["width"] / p["height"]) for p in ref])
        boxes = B.crop_boxes(torch.tensor([[h, w]] * n), scale, rrc.ratio, g)
        left, top, bw, bh = boxes.unbind(1)
        assert (left >= 0).all() and (top >= 0).all()
        assert (left + bw <= w).all() and (top + bh <= h).all()
        area, logr = (bw * bh / (h * w)).float(), torch.log(bw / bh).float()
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        # Quantiles of 4000 draws: sampling noise ~0.01; a wrong scale or ratio moves them more.
        assert (torch.quantile(area, q) - torch.quantile(ref_area, q)).abs().max() < 0.03
        assert (torch.quantile(logr, q) - torch.quantile(ref_logr, q)).abs().max() < 0.05
        # The crop position is uniform over the free range, as torchvision's randint.
        free = (w - bw).clamp(min=1)
        assert abs(float((left / free).mean()) - 0.5) < 0.03


def test_resized_crop_matches_cpu_crop_also_from_a_shrunk_padded_square():
    img = _smooth(1, 300, 400)[0]
    box = (50, 30, 240, 180)  # left, top, width, height in the original's pixels
    ref = v2.functional.resized_crop(img.float() / 255, 30, 50, 180, 240, [64, 64],
                                     antialias=True)
    boxes = torch.tensor([box], dtype=torch.float64)
    sizes = torch.tensor([[300, 400]])
    ours = B.resized_crop(img[None].float() / 255, boxes, sizes, sizes, [64, 64])[0]
    assert (ours - ref).abs().mean() < 0.01
    # The same box through DecodeFixed: shrunk to fit 200 px, padded to 200x200.
    square, geo = DecodeFixed(200)(img)
    assert square.shape == (3, 200, 200) and geo.tolist() == [300, 400, 150, 200]
    assert square[:, 150:].eq(square[:, 149:150]).all()  # the border repeated
    shrunk = B.resized_crop(square[None].float() / 255, boxes, geo[None, :2], geo[None, 2:],
                            [64, 64])[0]
    assert (shrunk - ref).abs().mean() < 0.02


# ---- the device path's views against the CPU path's ------------------------------------------

def test_view_statistics_match_the_cpu_path():
    """SimCLR's 96-px view (crop, flip, jitter, grayscale, blur) + BYOL's solarisation."""
    images = _smooth(300, 120, 140, seed=3)
    pipe = simclr_view(96, blur=0.5, solarize=0.2)
    cpu = _cpu_views(pipe, images, seed=0)
    dev = _device_views(pipe, images, seed=0)
    assert dev.shape == cpu.shape == (300, 3, 96, 96)
    # Per-image mean and std over the views: their distributions over 300 images must agree
    # (sampling noise of a mean of 300 ~0.03); without jitter/grayscale they would not.
    for stat in (lambda v: v.mean((1, 2, 3)), lambda v: v.std((1, 2, 3)),
                 lambda v: v.mean((2, 3)).std(1)):  # colourfulness: 0 for grayscale views
        a, b = stat(cpu), stat(dev)
        assert abs(float(a.mean() - b.mean())) < 0.06
        assert abs(float(a.std() - b.std())) < 0.06
    grey_cpu = (cpu.mean((2, 3)).std(1) < 1e-3).float().mean()
    grey_dev = (dev.mean((2, 3)).std(1) < 1e-3).float().mean()
    assert abs(float(grey_cpu - grey_dev)) < 0.08  # both ~0.2


def test_each_op_fires_per_image_at_its_rate():
    """Flip, grayscale, solarise, jitter, blur: the fraction of images changed is the op's
    probability (4 binomial sigmas at n=2000), decided per image within one batch."""
    n = 2000
    base = torch.linspace(0.05, 0.95, 16).view(1, 1, 1, 16).expand(n, 3, 16, 16).clone()
    base[:, 0] *= 0.5  # colourful and left-right asymmetric
    images = (base * 255).round().to(torch.uint8)
    keep = v2.RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = _device_views(v2.Compose([keep, v2.ToDtype(torch.float32, scale=True)]), images, 0)

    def rate(op, changed) -> float:
        out = _device_views(v2.Compose([keep, op, v2.ToDtype(torch.float32, scale=True)]),
                            images, 1)
        return float(changed(out).float().mean())

    diff = lambda out: (out - plain).abs().amax((1, 2, 3)) > 1e-3  # noqa: E731
    cases = [(v2.RandomHorizontalFlip(0.5), 0.5),
             (v2.RandomGrayscale(0.2), 0.2),
             (v2.RandomSolarize(128, p=0.3), 0.3),
             (v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), 0.8),
             (v2.RandomApply([SeparableGaussianBlur(3, (0.5, 2.0))], p=0.5), 0.5)]
    for op, p in cases:
        r = rate(op, diff)
        assert abs(r - p) < 4 * math.sqrt(p * (1 - p) / n), (op, r)
    flipped = _device_views(v2.Compose([keep, v2.RandomHorizontalFlip(0.5),
                                        v2.ToDtype(torch.float32, scale=True)]), images, 2)
    assert torch.allclose(flipped[diff(flipped)], plain[diff(flipped)].flip(-1), atol=1e-5)


def test_multi_crop_and_padded_images():
    """Differently sized files padded into one square: DINO's global and local crops come out
    at their sizes, and no view ever sees the padding, also with flip and jitter before the
    crop (BEiT's order): a constant image gives constant views (contrast uses the content's
    mean, the flip mirrors the content in place)."""
    sizes = [(60 + 7 * i, 90 - 5 * i) for i in range(8)]  # some larger than the square
    pil = [Image.new("RGB", (w, h), (204, 204, 204)) for h, w in sizes]
    dec = DecodeFixed(80)
    batch = [torch.stack(v) for v in zip(*[dec(im) for im in pil], strict=True)]
    assert batch[0].shape == (8, 3, 80, 80) and batch[1][:, 2:].max() == 80
    t = multi_crop_transform(48, 24, 2, 3, augment="byol")
    views = DeviceViews(t, seed=0)(batch)
    assert [tuple(v.shape) for v in views] == [(8, 3, 48, 48)] * 2 + [(8, 3, 24, 24)] * 3
    to_float = v2.ToDtype(torch.float32, scale=True)
    for before in ([], [v2.ColorJitter(contrast=0.9), v2.RandomHorizontalFlip()]):
        pipe = v2.Compose([*before, v2.RandomResizedCrop(24, scale=(0.05, 1.0)), to_float])
        dv = DeviceViews(MultiViewTransform([pipe] * 4), seed=1)
        for v in dv(batch):
            assert torch.allclose(v, torch.full_like(v, 0.8), atol=2e-3)
    # A flip before the crop mirrors the content in place: the whole image, flipped.
    ramp = torch.arange(60, dtype=torch.uint8).mul(4).view(1, 1, 60).expand(3, 40, 60)
    batch = [torch.stack(v) for v in zip(DecodeFixed(80)(ramp), strict=True)]
    whole = v2.RandomResizedCrop((40, 60), scale=(1.0, 1.0), ratio=(1.5, 1.5))
    pipe = v2.Compose([v2.RandomHorizontalFlip(1.0), whole, to_float])
    out = DeviceViews(MultiViewTransform([pipe]), seed=0)(batch)[0]
    assert torch.allclose(out[0], ramp.flip(-1).float() / 255, atol=1e-5)


def test_unsupported_op_is_a_config_error():
    with pytest.raises(ConfigError, match="data.augment_on=gpu cannot run the view op"):
        batched_pipeline(v2.Compose([v2.RandomResizedCrop(8), v2.RandomRotation(10)]))
    with pytest.raises(ConfigError, match="only flips and colour ops before the"):
        batched_pipeline(v2.Compose([v2.GaussianBlur(3), v2.RandomResizedCrop(8)]))
    with pytest.raises(ConfigError, match="needs a RandomResizedCrop"):
        batched_pipeline(v2.Compose([v2.RandomHorizontalFlip()]))


def test_every_builtin_method_has_device_views():
    """The driver's check (before Ray) restates each built-in method's views at its preset."""
    from pathlib import Path

    from hirl_ray.data.device_views import check_method_views
    from hirl_ray.methods import METHODS

    presets = Path(__file__).resolve().parents[1] / "experiments" / "small"
    checked = {}
    for name, cls in METHODS.items():
        if cls.__module__.startswith("hirl_ray."):
            cfg = load_config(presets / f"{name}.yaml")
            checked[name] = check_method_views(cls, cfg.method, cfg.data)
    assert checked["dino"] == 2 + 4 and checked["simclr"] == 2 and checked["beit"] == 1
    assert all(n > 0 for n in checked.values()), checked


def test_augment_on_config_checks():
    with pytest.raises(ConfigError, match="data.augment_on=gpu .* needs train.use_gpu=true"):
        load_config(None, {"data.augment_on": "gpu"})
    with pytest.raises(ConfigError, match="data.augment_on must be one of cpu, gpu"):
        load_config(None, {"data.augment_on": "tpu"})
    cfg = load_config(None, {"data.augment_on": "gpu", "train.use_gpu": True})
    assert cfg.data.augment_on == "gpu"


# ---- the loop hook: a tiny fit on CPU with the device-path views -------------------------------

def test_tiny_fit_with_device_views_learns():
    from hirl_ray.methods.hirl import HirlModel
    from hirl_ray.train.loop import StaticHierarchy, train_epoch
    from hirl_ray.train.optim import build_optimizer
    from hirl_ray.train.steps import train_views

    torch.manual_seed(0)
    cfg = load_config(None, {"model.width": 16, "method.hidden_dim": 64, "method.proj_dim": 32,
                             "hirl.enabled": False, "data.train_per_class": 10,
                             "data.augment_on": "gpu", "train.use_gpu": True})
    model = HirlModel.from_config(cfg)
    train_set = build_dataset(cfg.data, "train")
    transform, augment = train_views(cfg, model.method, train_set, rank=0)
    assert isinstance(transform, DecodeFixed) and isinstance(augment, DeviceViews)
    loader = DataLoader(ViewDataset(train_set, transform), batch_size=60, shuffle=True,
                        drop_last=True, generator=torch.Generator().manual_seed(0))
    opt = build_optimizer(model.param_groups(), cfg.train)
    losses, step = [], 0
    for epoch in range(4):
        stats, step = train_epoch(model, loader, opt, epoch=epoch, step=step,
                                  total_steps=4 * len(loader), base_lr=cfg.train.lr,
                                  warmup_steps=0, hierarchy=StaticHierarchy(),
                                  device=torch.device("cpu"), augment=augment)
        losses.append(stats.loss)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses


# ---- JPEG draft: decoded smaller only where no view changes ------------------------------------

def test_draft_reduction_rule_and_decode(tmp_path):
    view = simclr_view(224)  # scale (0.2, 1), ratio (3/4, 4/3)
    # Smallest crop side: sqrt(W*H * 0.2 * 0.75); reduced by k it must still be >= 224.
    assert pipeline_reduction(view, 400, 350) == 1
    assert pipeline_reduction(view, 1600, 1200) == 2
    assert pipeline_reduction(view, 4000, 3000) == 4
    for w, h in ((1600, 1200), (4000, 3000), (900, 700)):
        k = pipeline_reduction(view, w, h)
        assert math.sqrt(w * h * 0.2 * 0.75) / k >= 224
    # A pipeline whose geometry the rule cannot reason about is never reduced.
    assert pipeline_reduction(v2.Compose([v2.Resize(256), v2.RandomResizedCrop(224)]),
                              4000, 3000) == 1
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(_smooth(1, 1200, 1600)[0].permute(1, 2, 0).numpy()).save(
        folder / "big.jpg", quality=90)
    t = MultiViewTransform([view, view])
    assert load_rgb(str(folder / "big.jpg")).size == (1600, 1200)
    assert load_rgb(str(folder / "big.jpg"), t.max_reduction).size == (800, 600)
    views, index = ViewDataset(ImageFolderDataset(tmp_path, "train"), t)[0]
    assert index == 0 and [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2
