"""``make gpu-check``: the GPU code paths, on one GPU, in a few minutes.

Checks (each prints one line and goes into ``experiments/bench/results/gpu_check.json``):

1. ``amp_steps`` — a few AMP (fp16 autocast + GradScaler) training steps of every method (its
   ``experiments/small`` preset and views) with the semantic-path loss on, on CUDA: finite
   losses, steps/s.
2. ``host_syncs`` — host-device synchronisations per training step of every method (PyTorch's
   CUDA sync debug mode, an epoch of 2n steps minus one of n), fp32, float16 AMP and bfloat16
   AMP: none per step in fp32 and bfloat16 (float16's GradScaler reads one per step).
3. ``path_loss`` — the semantic-path loss on CUDA under autocast against a float64 re-statement of
   HIRL Eq. 4-6 on the CPU with the same negatives (value and gradient).
4. ``faiss_gpu`` — the prototype hierarchy built with faiss-gpu against faiss-cpu on the same
   features: NMI of the assignments per level (faiss-gpu differs run to run, so no bit equality).
5. ``augment_gpu`` — ``data.augment_on=gpu``: images/s of the device-side SimCLR views (2 x
   224 px, a batch of 256) against the CPU path on one core, and a few SimCLR training steps
   with the views made on the device (finite losses).
6. ``channels_last`` — informative: AMP training-step time of a ResNet-50 (batch 64, 224 px)
   with NCHW vs channels-last model and inputs (the loop converts inputs only on the CPU).
7. ``ray_fit`` — a 1-GPU Ray Train fit (``train.gpus_per_worker=0.5``) with the prototype actor on
   the same GPU (``hirl.actor_num_gpus=0.5``) running faiss-gpu, views made on the GPU
   (``data.augment_on=gpu``) and bfloat16 mixed precision.

Without a CUDA GPU it says so and exits 0. ``--device cpu`` runs the same checks on the CPU
(faiss-gpu skipped): the test suite uses it so that this script cannot rot unnoticed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "bench" / "results" / "gpu_check.json"


def _method_setup(name: str, device: torch.device, batch: int, steps: int
                  ) -> tuple[Any, torch.nn.Module, Any, list, Any] | None:
    """A method's small preset with HIRL on, a hierarchy, ``steps`` pinned batches of its
    views and an optimiser; ``None`` for a method registered outside the library."""
    from hirl_ray.config import load_config
    from hirl_ray.hierarchy import fit_hierarchy
    from hirl_ray.methods.hirl import HirlModel
    from hirl_ray.train.optim import build_optimizer

    preset = Path(__file__).resolve().parent / "small" / f"{name}.yaml"
    if not preset.is_file():
        return None
    torch.manual_seed(0)
    cfg = load_config(preset, {"hirl.num_clusters": [32, 8, 2], "hirl.num_neg_paths": 64})
    model = HirlModel.from_config(cfg).to(device)
    with torch.no_grad():  # a hierarchy in the space the heads project to
        z = model.heads[0](torch.randn(256, _head_in_dim(model), device=device)).float()
    h = fit_hierarchy(z.cpu(), [32, 8, 2], nredo=1, niter=5).to(device)
    transform = model.method.transform(cfg.data)
    images = (torch.rand(batch, 3, 40, 40) * 255).to(torch.uint8)
    views = [torch.stack(v) for v in zip(*[transform(im) for im in images], strict=True)]
    if device.type == "cuda":  # as the training loaders do on a GPU (pin_memory)
        views = [v.pin_memory() for v in views]
    batches = [(views, torch.arange(i * batch, (i + 1) * batch) % 256) for i in range(steps)]
    opt = build_optimizer(model.param_groups(), dataclasses.replace(cfg.train, lr=0.03))
    return cfg, model, h, batches, opt


def _epoch(model, batches, opt, h, device, scaler, amp_dtype=None):
    from hirl_ray.train.loop import StaticHierarchy, train_epoch

    stats, _ = train_epoch(model, batches, opt, epoch=0, step=0, total_steps=len(batches),
                           base_lr=0.03, warmup_steps=0, hierarchy=StaticHierarchy(h),
                           device=device, scaler=scaler, amp_dtype=amp_dtype, generator=None)
    return stats


def check_amp_steps(device: torch.device, quick: bool) -> dict[str, Any]:
    """A few AMP steps per method (its small preset, its own views) with HIRL on; losses finite."""
    from hirl_ray.methods import METHODS

    steps, batch = (2, 16) if quick else (10, 128)
    out: dict[str, Any] = {}
    for name in METHODS:
        setup = _method_setup(name, device, batch, steps)
        if setup is None:
            continue
        cfg, model, h, batches, opt = setup
        scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        start = time.perf_counter()
        stats = _epoch(model, batches, opt, h, device, scaler)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        finite = all(math.isfinite(v) for v in (stats.loss, stats.semantic_loss or 0.0))
        out[name] = {"loss": stats.loss, "semantic_loss": stats.semantic_loss,
                     "steps_per_s": steps / seconds, "finite": finite,
                     "backbone": cfg.model.backbone, "views": len(batches[0][0])}
    return {"ok": all(v["finite"] and v["semantic_loss"] is not None for v in out.values()),
            "methods": out}


def _count_syncs(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Host-device synchronisations ``fn`` makes (PyTorch's CUDA sync debug mode), and where:
    ``{"file:line": count}`` of the Python lines that called the synchronising operations."""
    import collections
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchronizing" in str(w.message)]
    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return len(syncs), dict(where.most_common(6))


def check_host_syncs(device: torch.device, quick: bool) -> dict[str, Any]:
    """Host syncs per training step of every method with HIRL on: an epoch of ``2n`` steps
    minus one of ``n`` steps (the reads at the end of an epoch cancel out), in fp32, under
    float16 AMP (whose GradScaler reads its inf check every step by design) and under bfloat16
    AMP (no scaler). ok: none per step in fp32 and bfloat16.
    """
    from hirl_ray.methods import METHODS

    if device.type != "cuda":
        # The same set-up runs, so the check cannot rot; only CUDA has a sync debug mode.
        setup = _method_setup("simclr", device, 8, 2)
        assert setup is not None
        _, model, h, batches, opt = setup
        _epoch(model, batches, opt, h, device, None)
        return {"ok": None, "skipped": "sync debug mode is CUDA-only (the set-up ran on cpu)"}
    n, batch = (2, 16) if quick else (8, 64)
    out: dict[str, Any] = {}
    for name in METHODS:
        per_step: dict[str, Any] = {}
        for mode in ("fp32", "amp", "amp_bf16"):
            counts, where = [], {}
            for steps in (n, 2 * n):
                setup = _method_setup(name, device, batch, steps)
                if setup is None:
                    break
                _, model, h, batches, opt = setup
                scaler = torch.amp.GradScaler("cuda") if mode == "amp" else None
                dtype = torch.bfloat16 if mode == "amp_bf16" else None
                _epoch(model, batches[:1], opt, h, device, scaler, dtype)  # warm-up: lazy state
                count, where = _count_syncs(functools.partial(_epoch, model, batches, opt, h,
                                                              device, scaler, dtype))
                counts.append(count)
            if len(counts) == 2:
                per_step[mode] = (counts[1] - counts[0]) / n
                per_step[f"{mode}_where"] = where  # of the 2n-step epoch
        if per_step:
            out[name] = per_step
    # <= 0: a one-time sync (BEiT's tokenizer fit) may land in either epoch.
    return {"ok": all(v["fp32"] <= 0 and v["amp_bf16"] <= 0 for v in out.values()),
            "methods": out}


def _head_in_dim(model: torch.nn.Module) -> int:
    first = next(m for m in model.heads[0].modules() if isinstance(m, torch.nn.Linear))
    return int(first.in_features)


def _reference_path_loss(z: list[torch.Tensor], pos: list[torch.Tensor], neg: list[torch.Tensor],
                         centroids: list[torch.Tensor], eps: float) -> torch.Tensor:
    """HIRL Eq. 4-6 in float64, written from the paper: per-sample average over true negatives."""
    p_pos = torch.ones(z[0].shape[0], dtype=torch.float64)
    p_neg = torch.ones(neg[0].shape, dtype=torch.float64)
    differs = torch.zeros(neg[0].shape, dtype=torch.bool)
    for zl, pl, nl, cl in zip(z, pos, neg, centroids, strict=True):
        p_pos = p_pos * ((zl * cl[pl]).sum(-1) + 1) / 2
        p_neg = p_neg * ((zl[:, None, :] * cl[nl]).sum(-1) + 1) / 2
        differs |= nl != pl[:, None]
    pos_term = -torch.log(p_pos + eps)
    neg_term = -torch.log(1 - p_neg + eps) * differs
    per_sample_neg = neg_term.sum(1) / (differs.sum(1) + eps)
    return ((pos_term + per_sample_neg) / 2).mean()


def check_path_loss(device: torch.device, quick: bool) -> dict[str, Any]:
    """The path loss under autocast on ``device`` vs a float64 CPU re-statement."""
    import torch.nn.functional as F

    from hirl_ray.hierarchy import PrototypeHierarchy
    from hirl_ray.losses.semantic_path import sample_negative_paths, semantic_path_loss

    ks, dim, batch, m = ((60, 20, 5), 32, 16, 32) if quick else ((3000, 1000, 100), 128, 256, 1000)
    g = torch.Generator().manual_seed(0)
    centroids = [F.normalize(torch.randn(k, dim, generator=g), dim=1) for k in ks]
    parents = [torch.randint(ks[i + 1], (ks[i],), generator=g) for i in range(len(ks) - 1)]
    n = 4 * batch
    a0 = torch.randint(ks[0], (n,), generator=g)
    assignments = [a0]
    for p in parents:
        assignments.append(p[assignments[-1]])
    h = PrototypeHierarchy(version=1, centroids=tuple(centroids), parents=tuple(parents),
                           assignments=tuple(assignments),
                           densities=tuple(torch.full((k,), 0.2) for k in ks))
    index = torch.randperm(n, generator=g)[:batch]
    # Keep z off the clamp at cos = ±1: a random direction, not a prototype.
    z = [F.normalize(torch.randn(batch, dim, generator=g), dim=1) for _ in ks]
    z_dev = [t.to(device).clone().requires_grad_(True) for t in z]
    hd = h.to(device)
    with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda"
                        else torch.bfloat16):
        loss = semantic_path_loss(z_dev, index.to(device), hd, m,
                                  torch.Generator().manual_seed(1))
    loss.backward()
    starts = sample_negative_paths(h, batch, m, torch.Generator().manual_seed(1), "cpu")
    ancestors = h.ancestors()
    z64 = [t.detach().double().requires_grad_(True) for t in z]
    ref = _reference_path_loss(z64, [a[index] for a in h.assignments],
                               [anc[starts] for anc in ancestors],
                               [c.double() for c in centroids], eps=1e-6)
    ref.backward()
    grad_err = max(float((zd.grad.cpu().double() - zr.grad).abs().max() /
                         zr.grad.abs().max().clamp(min=1e-12))
                   for zd, zr in zip(z_dev, z64, strict=True))
    value, reference = float(loss.detach()), float(ref.detach())
    loss_err = abs(value - reference) / abs(reference)
    return {"ok": loss.dtype == torch.float32 and loss_err < 1e-4 and grad_err < 1e-3,
            "loss": value, "reference": reference, "loss_dtype": str(loss.dtype),
            "rel_loss_err": loss_err, "rel_grad_err": grad_err}


def check_faiss_gpu(device: torch.device, quick: bool) -> dict[str, Any]:
    """faiss-gpu vs faiss-cpu hierarchy on the same features: NMI per level >= 0.95."""
    import faiss
    from sklearn.metrics import normalized_mutual_info_score

    from hirl_ray.hierarchy import fit_hierarchy
    from hirl_ray.hierarchy.faiss_build import describe_faiss

    build = describe_faiss()
    if device.type != "cuda" or faiss.get_num_gpus() == 0:
        return {"ok": None, "skipped": f"{build} has no GPU here (run `make install-gpu`)"}
    n, dim, ks = (200_000, 128, [1000, 100, 10]) if not quick else (20_000, 64, [100, 10])
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(ks[0], dim, generator=g)
    x = centres[torch.randint(ks[0], (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)
    timings, results = {}, {}
    for name, use_gpu in (("cpu", False), ("gpu", True)):
        start = time.perf_counter()
        results[name] = fit_hierarchy(x, ks, seed=0, nredo=1, use_gpu=use_gpu)
        timings[name] = time.perf_counter() - start
    nmi = [float(normalized_mutual_info_score(a.numpy(), b.numpy()))
           for a, b in zip(results["cpu"].assignments, results["gpu"].assignments,
                           strict=True)]
    return {"ok": min(nmi) >= 0.95, "faiss": build, "nmi_per_level": nmi,
            "cpu_s": timings["cpu"], "gpu_s": timings["gpu"]}


def check_ray_fit(device: torch.device, quick: bool) -> dict[str, Any]:
    """A 1-GPU Ray Train fit with the prototype actor sharing the GPU."""
    import hirl_ray

    on_gpu = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"train.use_gpu": on_gpu, "train.num_workers": 1,
                     "train.epochs": 3 if quick else 4, "hirl.warmup_epochs": 1,
                     "hirl.rebuild_every_epochs": 1, "storage.path": tmp,
                     "storage.name": "gpu_check"}
        if on_gpu:
            # The views made on the GPU and bfloat16 mixed precision, through the Ray worker.
            # Epochs take under a second then: wait for each rebuild (hirl.async_rebuild=false),
            # or 4 epochs end before the first hierarchy arrives (seen on an H200).
            overrides.update({"train.gpus_per_worker": 0.5, "hirl.actor_num_gpus": 0.5,
                              "data.augment_on": "gpu", "train.amp_dtype": "bfloat16",
                              "hirl.async_rebuild": False})
        if quick:
            overrides.update({"data.train_per_class": 10, "data.test_per_class": 5,
                              "model.width": 16, "hirl.num_clusters": [12, 4],
                              "train.batch_size": 32})
        start = time.perf_counter()
        result = hirl_ray.fit(None, overrides)
        seconds = time.perf_counter() - start
        versions = result.metrics.get("train/hierarchy_version", 0)
        knn = {k: v for k, v in result.metrics.items() if k.startswith("knn_acc/")}
    return {"ok": bool(versions) and all(math.isfinite(v) for v in knn.values()),
            "seconds": seconds, "hierarchy_version": versions, **knn}


def check_augment_gpu(device: torch.device, quick: bool) -> dict[str, Any]:
    """Device-side views (``data.augment_on=gpu``) vs the CPU path; SimCLR steps with them."""
    from torch.utils.data import DataLoader

    from hirl_ray.config import load_config
    from hirl_ray.data import ViewDataset, build_dataset
    from hirl_ray.data.device_views import DecodeFixed, DeviceViews
    from hirl_ray.data.transforms import multi_view_transform
    from hirl_ray.methods.hirl import HirlModel
    from hirl_ray.train.loop import StaticHierarchy, train_epoch
    from hirl_ray.train.optim import build_optimizer
    from hirl_ray.train.steps import train_views

    size, batch, cpu_images = (64, 16, 4) if quick else (224, 256, 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU path as one loader worker runs it
    try:
        g = torch.Generator().manual_seed(0)
        small = torch.rand(batch, 3, 24, 28, generator=g)  # smooth content, ~ImageNet's shape
        images = (torch.nn.functional.interpolate(small, size=(size * 7 // 4, size * 2),
                                                  mode="bilinear") * 255).to(torch.uint8)
        transform = multi_view_transform(size)  # SimCLR's 2 views
        start = time.thread_time()  # CPU seconds of this thread: one core, however busy
        for im in images[:cpu_images]:
            transform(im)
        cpu_img_s = cpu_images / (time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    dec = DecodeFixed(2 * size)
    decoded = [torch.stack(v).to(device) for v in zip(*[dec(im) for im in images], strict=True)]
    views = DeviceViews(transform, seed=0)
    views(decoded)  # warm-up (kernels, cuDNN plans)
    reps = 1 if quick else 10
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        out = views(decoded)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dev_img_s = reps * batch / (time.perf_counter() - start)
    shapes_ok = [tuple(v.shape) for v in out] == [(batch, 3, size, size)] * 2
    # A few SimCLR steps with the views made on the device, through the loop's hook.
    torch.manual_seed(0)
    cfg = load_config(None, {"data.augment_on": "gpu", "train.use_gpu": True,
                             "hirl.enabled": False, "data.train_per_class": 10,
                             "model.width": 16 if quick else 64})
    model = HirlModel.from_config(cfg).to(device)
    train_set = build_dataset(cfg.data, "train")
    cpu_side, augment = train_views(cfg, model.method, train_set, rank=0)
    loader = DataLoader(ViewDataset(train_set, cpu_side), batch_size=64, shuffle=True,
                        drop_last=True, pin_memory=device.type == "cuda")
    opt = build_optimizer(model.param_groups(), cfg.train)
    steps = 2 if quick else 6
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    stats, _ = train_epoch(model, loader, opt, epoch=0, step=0, total_steps=steps,
                           base_lr=cfg.train.lr, warmup_steps=0, hierarchy=StaticHierarchy(),
                           device=device, scaler=scaler, max_steps=steps, augment=augment)
    return {"ok": shapes_ok and math.isfinite(stats.loss), "views_img_s_device": dev_img_s,
            "views_img_s_cpu_1core": cpu_img_s, "speedup_vs_1core": dev_img_s / cpu_img_s,
            "batch": batch, "size": size, "views": 2, "train_loss": stats.loss,
            "train_steps": stats.steps}


def check_channels_last(device: torch.device, quick: bool) -> dict[str, Any]:
    """Step time of a ResNet (AMP on CUDA) with NCHW vs channels-last model and batch."""
    import torchvision

    arch, batch, size, reps = ("resnet18", 4, 64, 2) if quick else ("resnet50", 64, 224, 10)
    on_cuda = device.type == "cuda"
    times: dict[str, list[float]] = {"nchw": [], "channels_last": []}
    models, opts = {}, {}
    for fmt in times:
        torch.manual_seed(0)
        m = getattr(torchvision.models, arch)().to(device)
        if fmt == "channels_last":
            m = m.to(memory_format=torch.channels_last)
        models[fmt], opts[fmt] = m, torch.optim.SGD(m.parameters(), lr=0.01)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    scaler = torch.amp.GradScaler("cuda") if on_cuda else None

    def step(fmt: str) -> float:
        inp = x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, enabled=on_cuda):
            loss = torch.nn.functional.cross_entropy(models[fmt](inp), y)
        opts[fmt].zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opts[fmt])
            scaler.update()
        else:
            loss.backward()
            opts[fmt].step()
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for r in range(reps + 2):  # 2 warm-up rounds (cuDNN autotuning), then interleaved
        for fmt in times:
            t = step(fmt)
            if r >= 2:
                times[fmt].append(t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"ok": True, "arch": arch, "batch": batch, "size": size,
            "step_s": med, "nchw_over_channels_last": med["nchw"] / med["channels_last"],
            "img_s_channels_last": batch / med["channels_last"]}


CHECKS: dict[str, Callable[[torch.device, bool], dict[str, Any]]] = {
    "amp_steps": check_amp_steps, "host_syncs": check_host_syncs, "path_loss": check_path_loss,
    "faiss_gpu": check_faiss_gpu, "augment_gpu": check_augment_gpu,
    "channels_last": check_channels_last, "ray_fit": check_ray_fit,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for the test suite)")
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), help="run these checks only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing "
              "checked. Run `make install-gpu gpu-check` on a machine with an NVIDIA GPU.")
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"gpu-check on {name}, torch {torch.__version__}", flush=True)
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "checks": {}}
    failed = []
    for check, fn in CHECKS.items():
        if args.only and check not in args.only:
            continue
        start = time.perf_counter()
        try:
            res = fn(device, args.quick)
        except ModuleNotFoundError as e:  # e.g. a bare GPU box without Ray: say what is missing
            res = {"ok": None, "skipped": f"{e.name} is not installed ({e})"}
        except Exception as e:  # one broken check must not hide the others' results
            res = {"ok": False, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()}
        res["wall_s"] = time.perf_counter() - start
        report["checks"][check] = res
        status = {True: "ok", False: "FAIL", None: "skipped"}[res["ok"]]
        detail = res.get("skipped") or res.get("error") or ""
        print(f"  {check:<10} {status:<8} {res['wall_s']:6.1f}s  {detail}", flush=True)
        if res["ok"] is False:
            failed.append(check)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all run checks passed'} "
          f"({args.out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
