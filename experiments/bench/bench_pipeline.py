"""Benchmark 8: the input pipeline, in images/s per CPU core, against what a GPU consumes.

The benchmark writes an image folder of real JPEG files itself (random smooth content, PIL
quality 90): ``small`` images of about 400x350 px (ImageNet's typical size) and a few ``large``
1600x1200 px photos. On one core (one thread, in this process: what one DataLoader worker
does) it measures images/s through the training path (``ImageFolderDataset`` + ``ViewDataset``
with the method's own ``transform(data_cfg)``):

- ``decode``: the JPEG decode alone (``load_rgb``);
- ``simclr`` (2 views at 224 px) and ``dino`` (multi-crop 2x224 + 6x96, DINO's BYOL-style
  views), as the pipeline was (``before``: torchvision's full k×k Gaussian blur, full-size
  decode) and with each cheap fix: ``+sep_blur`` (the same blur as two 1-D passes,
  ``SeparableGaussianBlur``) and ``+draft`` (JPEG decoded at reduced size where no view
  changes, ``Image.draft``);
- ``gpu_decode``: the CPU part of ``data.augment_on=gpu`` (decode, resize to the fixed square).

Variants run interleaved (common.interleaved); ratios are of medians. Then, on paper, the CPU
cores one GPU needs = (GPU images/s) / (images/s per core), with the GPU figure's source.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from experiments.bench.common import cli, interleaved, median, result, target
from hirl_ray.config import load_config
from hirl_ray.data import ViewDataset
from hirl_ray.data.device_views import DecodeFixed, decode_size
from hirl_ray.data.folder import ImageFolderDataset
from hirl_ray.data.transforms import MultiViewTransform, SeparableGaussianBlur
from hirl_ray.methods import METHODS

FULL = {"small": 128, "large": 16, "repeats": 3}
QUICK = {"small": 12, "large": 3, "repeats": 1}
SIZES = {"small": (400, 350), "large": (1600, 1200)}

#: GPU-side demand. Source: NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README,
#: "Training performance: NVIDIA DGX A100 (8x A100 80GB)": 1 GPU, mixed precision, 2,470 img/s
#: (supervised: one 224-px view per image, DALI loader). No H100 row there; an H100 is faster,
#: so the cores below are a lower bound for one.
RESNET50_A100_IMG_S = 2470.0
#: The lead's measurement on an H100 (2026-11, make gpu-check): the small-preset MoCo v2, a
#: tiny CNN on 32-px images (not ResNet-50), batch 128: 62 steps/s.
TINY_CNN_H100_IMG_S = 62 * 128.0


def write_jpegs(root: Path, n: int, size: tuple[int, int], seed: int) -> Path:
    """``root/train/c<k>/<i>.jpg``: ``n`` JPEGs of about ``size`` px (±10%), smooth random
    content (a 1/16-scale random image upsampled bicubically), quality 90."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (int(s * rng.uniform(0.9, 1.1)) for s in size)
        small = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        folder = root / "train" / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:04d}.jpg", quality=90)
    return root


def method_transform(name: str, overrides: dict[str, Any]) -> MultiViewTransform:
    """The method's own ``transform(data_cfg)`` at the configured sizes. The method class's
    ``transform`` reads only ``self.cfg``, so the network (a 65k-prototype DINO head) is not
    built for it."""
    cfg = load_config(None, {"method.name": name, "train.num_workers": 1, **overrides})
    return METHODS.get(name).transform(SimpleNamespace(cfg=cfg.method), cfg.data)


def before_fixes(transform: MultiViewTransform) -> MultiViewTransform:
    """The pipeline as it was: torchvision's full 2-D Gaussian blur (same kernel and sigmas)."""
    def swap(op: Any) -> Any:
        if isinstance(op, SeparableGaussianBlur):
            return v2.GaussianBlur(op.kernel_size, op.sigma)
        if isinstance(op, v2.RandomApply):
            return v2.RandomApply([swap(t) for t in op.transforms], p=op.p)
        return op

    done: dict[int, Any] = {}  # a pipeline shared by several views stays shared
    out = []
    for t in transform.transforms:
        if id(t) not in done:
            done[id(t)] = v2.Compose([swap(op) for op in t.transforms])
        out.append(done[id(t)])
    return MultiViewTransform(out)


class NoDraft:
    """A transform without ``max_reduction``: the file is decoded at full size."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        return self.transform(image)


def per_image(dataset: Any, transform: Any) -> Any:
    """One pass over the folder through the training path (``ViewDataset``)."""
    views = ViewDataset(dataset, transform)

    def go() -> None:
        torch.manual_seed(0)
        for i in range(len(views)):
            views[i]
    return go


def variants(ds: ImageFolderDataset, simclr: MultiViewTransform, dino: MultiViewTransform,
             large: bool) -> dict[str, Any]:
    """The pipelines compared on one folder."""
    dec = DecodeFixed(decode_size(ds, simclr))
    out = {
        "decode": lambda: [ds.image(i) for i in range(len(ds))],
        "simclr before": per_image(ds, NoDraft(before_fixes(simclr))),
        "simclr +sep_blur": per_image(ds, NoDraft(simclr)),
        "dino before": per_image(ds, NoDraft(before_fixes(dino))),
        "dino +sep_blur": per_image(ds, NoDraft(dino)),
        "gpu_decode": per_image(ds, dec),
    }
    if large:  # at ~400 px no view allows a reduction (draft is a no-op): measured on photos
        out["decode draft(simclr)"] = lambda: [ds.image(i, simclr.max_reduction)
                                               for i in range(len(ds))]
        out["simclr +sep_blur +draft"] = per_image(ds, simclr)
        out["dino +sep_blur +draft"] = per_image(ds, dino)
    return out


def run(quick: bool = False, **overrides: Any) -> dict[str, Any]:
    """Images/s per core of each pipeline; cores per GPU on paper."""
    started = time.perf_counter()
    p = {**(QUICK if quick else FULL), **overrides}
    torch.set_num_threads(1)
    simclr = method_transform("simclr", {"data.image_size": 224})
    dino = method_transform("dino", {"data.image_size": 224, "model.backbone": "vit_tiny",
                                     "model.patch_size": 16, "method.num_local_crops": 6,
                                     "method.local_crop_size": 96})
    figures: dict[str, Any] = {"images_per_s": {}, "ratios": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for k, kind in enumerate(("small", "large")):
            if not p[kind]:
                continue
            root = write_jpegs(Path(tmp) / kind, p[kind], SIZES[kind], seed=k)
            ds = ImageFolderDataset(root, "train")
            times = interleaved(variants(ds, simclr, dino, kind == "large"), p["repeats"],
                                warmup=1 if not quick else 0)
            figures["images_per_s"][kind] = {n: len(ds) / median(t) for n, t in times.items()}
    ips = figures["images_per_s"]
    small = ips.get("small", {})
    for kind, fig in ips.items():
        r = figures["ratios"].setdefault(kind, {})
        for m in ("simclr", "dino"):
            r[f"{m} sep_blur / before"] = fig[f"{m} +sep_blur"] / fig[f"{m} before"]
            if f"{m} +sep_blur +draft" in fig:
                r[f"{m} sep_blur+draft / before"] = fig[f"{m} +sep_blur +draft"] / fig[
                    f"{m} before"]
        r["gpu_decode / simclr +sep_blur"] = fig["gpu_decode"] / fig["simclr +sep_blur"]
    # On paper: an SSL image costs the GPU one ResNet-50 pass per 224-px view (2 for SimCLR;
    # DINO's 6 local 96-px crops add 6 * (96/224)^2 of one), the teacher's no-grad forward aside.
    gpu = {"simclr": RESNET50_A100_IMG_S / 2,
           "dino": RESNET50_A100_IMG_S / (2 + 6 * (96 / 224) ** 2)}
    cores = {}
    if small:
        for m in ("simclr", "dino"):
            cores[f"{m} before"] = gpu[m] / small[f"{m} before"]
            cores[f"{m} +sep_blur"] = gpu[m] / small[f"{m} +sep_blur"]
            cores[f"{m} augment_on=gpu"] = gpu[m] / small["gpu_decode"]
        cores["tiny CNN on H100, simclr +sep_blur"] = TINY_CNN_H100_IMG_S / small[
            "simclr +sep_blur"]
    figures["gpu_images_per_s"] = {**gpu, "tiny_cnn_h100": TINY_CNN_H100_IMG_S}
    figures["cores_per_gpu"] = cores
    figures["gpu_source"] = (
        "ResNet-50 v1.5, 1x A100 80GB, mixed precision: 2,470 img/s (NVIDIA "
        "DeepLearningExamples PyTorch/Classification/ConvNets/resnet50v1.5 README, DGX A100 "
        "training performance); per SSL image /2 (SimCLR: 2 views) or /(2 + 6*(96/224)^2) "
        "(DINO multi-crop). An H100 is faster: a lower bound for one.")
    print_table(figures)
    s = figures["ratios"].get("small", {})
    targets = [
        target("simclr 224: sep_blur / before", s.get("simclr sep_blur / before"), ">=", 1.0),
        target("dino 2x224+6x96: sep_blur / before", s.get("dino sep_blur / before"), ">=", 1.0),
        target("1600x1200 simclr: sep_blur+draft / before",
               figures["ratios"].get("large", {}).get("simclr sep_blur+draft / before"),
               ">=", 1.0),
        target("cores per A100 (ResNet-50 SimCLR), CPU views",
               cores.get("simclr +sep_blur"), "<=", 1e9, "informative"),
        target("cores per A100 (ResNet-50 SimCLR), augment_on=gpu",
               cores.get("simclr augment_on=gpu"), "<=", 1e9, "informative"),
    ]
    notes = [f"one thread, {p['small']} JPEGs of ~{SIZES['small']} px and {p['large']} of "
             f"~{SIZES['large']} px, {p['repeats']} interleaved pass(es)", figures["gpu_source"]]
    return result("pipeline", quick, p, figures, targets, notes, started)


def print_table(figures: dict[str, Any]) -> None:
    """The per-core table and the cores-per-GPU estimate."""
    for kind, fig in figures["images_per_s"].items():
        print(f"  images/s per core, {kind} JPEGs ~{SIZES[kind][0]}x{SIZES[kind][1]}:")
        for name, v in fig.items():
            print(f"    {name:<26} {v:8.1f}")
    print("  cores per GPU (GPU images/s / images/s per core):")
    for name, v in figures["cores_per_gpu"].items():
        print(f"    {name:<36} {v:6.1f}")


if __name__ == "__main__":
    cli("pipeline", run, __doc__.splitlines()[0])
