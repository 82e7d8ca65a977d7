"""Benchmark 1: the semantic-path loss vs the official formulation (HIRL Eq. 4-6).

The official HIRL code scores negative paths by *materialising* them: it gathers the centroids
of every level of every negative path of every sample into a ``(B, M, L, D)`` tensor,
normalises it, repeats the embeddings to the same shape, multiplies and sums over ``D``.
:func:`official_path_loss` below is that formulation, written against our hierarchy type and
our negative sampler, so both compute the same number on the same paths.

Ours (:func:`hirl_ray.losses.semantic_path_loss`) does one ``(B, K_l)`` matmul per level and
gathers path entries from it: memory ``O(B (K_l + M))`` instead of ``O(B M L D)``.

Figures: forward+backward seconds (median, interleaved), peak memory allocated by the step
(CUDA ``max_memory_allocated``; CPU: the profiler's exact allocator totals), and the max relative
difference (``max|a-b| / max|b|``) of the loss and of the gradients w.r.t. every level's
embedding.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from experiments.bench.common import cli, interleaved, median, peak_memory, result, target
from hirl_ray.hierarchy import PrototypeHierarchy
from hirl_ray.losses.semantic_path import sample_negative_paths, semantic_path_loss

#: (name, batch, num_neg_paths, dim, clusters): the paper's ImageNet set-up per GPU, and a
#: small one. ``quick`` keeps both shapes and only lowers the repeats.
SHAPES: tuple[tuple[str, int, int, int, tuple[int, ...]], ...] = (
    ("paper", 32, 1000, 2048, (30000, 10000, 1000)),
    ("small", 256, 1000, 128, (3000, 1000, 100)),
)


def official_path_loss(
    z: Sequence[Tensor],
    index: Tensor,
    h: PrototypeHierarchy,
    num_neg_paths: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """The official formulation: gather every negative path's centroids, ``(B, M, L, D)``.

    Same equations and the same negative paths as :func:`semantic_path_loss` (identically
    seeded generators draw identical paths), so values and gradients must agree.
    """
    device = z[0].device
    batch, levels = z[0].shape[0], h.num_levels
    rows = index.to(h.assignments[0].device, torch.long)
    pos_nodes = torch.stack([a[rows] for a in h.assignments], dim=1).to(device)  # (B, L)
    start = sample_negative_paths(h, batch, num_neg_paths, generator, device)  # (B, M)
    neg_nodes = torch.stack([a.to(device)[start] for a in h.ancestors()], dim=-1)  # (B, M, L)
    centroids = [c.to(device=device, dtype=torch.float32) for c in h.centroids]
    neg_c = torch.stack([centroids[lv][neg_nodes[..., lv]] for lv in range(levels)], dim=2)
    neg_c = F.normalize(neg_c, dim=-1)  # (B, M, L, D)
    pos_c = F.normalize(
        torch.stack([centroids[lv][pos_nodes[:, lv]] for lv in range(levels)], dim=1), dim=-1
    )  # (B, L, D)
    zz = torch.stack([zl.float() for zl in z], dim=1)  # (B, L, D)
    z_rep = zz.unsqueeze(1).repeat(1, num_neg_paths, 1, 1)  # (B, M, L, D)
    p_neg = ((((z_rep * neg_c).sum(-1) + 1) / 2).clamp(0, 1)).prod(-1)  # (B, M)
    p_pos = ((((zz * pos_c).sum(-1) + 1) / 2).clamp(0, 1)).prod(-1)  # (B,)
    differs = (neg_nodes != pos_nodes[:, None, :]).any(-1)
    p_neg = torch.where(differs, p_neg, torch.zeros_like(p_neg))
    neg_terms = -torch.log(1 - p_neg + eps)
    mask = differs.float()
    # Official per-sample average: sum_j mask t / (sum_j mask + eps), then mean of (pos + neg) / 2.
    neg_loss = (neg_terms * mask).sum(-1) / (mask.sum(-1) + eps)
    return ((-torch.log(p_pos + eps) + neg_loss) / 2).mean()


def random_hierarchy(
    ks: Sequence[int], dim: int, num_samples: int, seed: int, device: str
) -> PrototypeHierarchy:
    """A random, consistent prototype tree (unit centroids, random parents, chained paths)."""
    g = torch.Generator().manual_seed(seed)
    centroids = [F.normalize(torch.randn(k, dim, generator=g), dim=1) for k in ks]
    parents = [torch.randint(ks[lv + 1], (ks[lv],), generator=g) for lv in range(len(ks) - 1)]
    assignments = [torch.randint(ks[0], (num_samples,), generator=g)]
    for p in parents:
        assignments.append(p[assignments[-1]])
    h = PrototypeHierarchy(
        version=1,
        centroids=tuple(centroids),
        parents=tuple(parents),
        assignments=tuple(assignments),
        densities=tuple(torch.full((k,), 0.2) for k in ks),
    )
    return h.to(device)


def _step(
    fn: Callable[..., Tensor],
    z: list[Tensor],
    index: Tensor,
    h: PrototypeHierarchy,
    m: int,
    seed: int,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    loss = fn(z, index, h, m, torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(loss, z)
    return loss.detach(), grads


def _rel_diff(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b| (a relative error that tiny entries cannot blow up)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def measure_shape(
    batch: int,
    num_neg: int,
    dim: int,
    ks: Sequence[int],
    repeats: int,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Time, memory and agreement of ours vs the official formulation at one shape."""
    h = random_hierarchy(ks, dim, num_samples=max(4 * batch, 10_000), seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    z = [
        F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device).requires_grad_()
        for _ in ks
    ]
    index = torch.randint(h.num_samples, (batch,), generator=g).to(device)
    ours_loss, ours_grads = _step(semantic_path_loss, z, index, h, num_neg, seed)
    ref_loss, ref_grads = _step(official_path_loss, z, index, h, num_neg, seed)
    loss_diff = _rel_diff(ours_loss, ref_loss)
    grad_diff = max(_rel_diff(a, b) for a, b in zip(ours_grads, ref_grads, strict=True))
    del ours_grads, ref_grads
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(fn: Callable[..., Tensor]) -> Callable[[], None]:
        def go() -> None:
            _step(fn, z, index, h, num_neg, seed)
            sync()

        return go

    variants = {"ours": run(semantic_path_loss), "official": run(official_path_loss)}
    times = interleaved(variants, repeats=repeats, warmup=0)  # both already ran once above
    mem = {}
    for name, fn in variants.items():
        gc.collect()
        mem[name] = peak_memory(fn, device)
    t_ours, t_ref = median(times["ours"]), median(times["official"])
    return {
        "batch": batch,
        "num_neg_paths": num_neg,
        "dim": dim,
        "clusters": list(ks),
        "device": device,
        "repeats": repeats,
        "ours_s": t_ours,
        "official_s": t_ref,
        "speedup": t_ref / t_ours,
        "ours_peak_mb": mem["ours"] / 2**20,
        "official_peak_mb": mem["official"] / 2**20,
        "memory_ratio": mem["official"] / max(mem["ours"], 1),
        "path_tensor_mb": batch * num_neg * len(ks) * dim * 4 / 2**20,
        "loss_rel_diff": loss_diff,
        "grad_rel_diff": grad_diff,
    }


def run(
    quick: bool = False,
    shapes: Sequence[tuple[str, int, int, int, tuple[int, ...]]] = SHAPES,
    repeats: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Measure every shape; targets at the paper's shape: ≥30× faster, ≥10× less memory."""
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reps = repeats or (3 if quick else 10)
    figures = {name: measure_shape(b, m, d, ks, reps, device) for name, b, m, d, ks in shapes}
    targets = []
    for name, fig in figures.items():
        targets.append(
            target(
                f"{name}: max rel. diff (loss, grads)",
                max(fig["loss_rel_diff"], fig["grad_rel_diff"]),
                "<=",
                1e-5,
            )
        )
    if "paper" in figures:
        p = figures["paper"]
        targets.insert(0, target("paper: speed-up vs official", p["speedup"], ">=", 30))
        targets.insert(
            1, target("paper: peak-memory ratio vs official", p["memory_ratio"], ">=", 10)
        )
    notes = [
        f"device {device}, {torch.get_num_threads()} thread(s); peak memory = bytes "
        + (
            "above the pre-step level (CUDA max_memory_allocated)"
            if device != "cpu"
            else "allocated by the step (torch.profiler profile_memory: exact allocator "
            "totals; tracemalloc cannot see PyTorch's allocator)"
        )
    ]
    params = {"repeats": reps, "device": device, "shapes": [list(s) for s in shapes]}
    return result("path_loss", quick, params, figures, targets, notes, started)


if __name__ == "__main__":
    cli("path_loss", run, __doc__.splitlines()[0])
