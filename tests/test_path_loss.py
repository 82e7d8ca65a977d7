"""Semantic path loss (HIRL Eq. 4-6): batched version == slow literal reference.

The reference (``tests/path_loss_reference.py``) shares no code with the loss. No test puts a
cosine on the clamp boundary by accident: where one sits there, it is past it by a margin (1e-6)
far above rounding, so the result does not depend on the CPU's kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hirl_ray.hierarchy import PrototypeHierarchy
from hirl_ray.losses.semantic_path import sample_negative_paths, semantic_path_loss
from tests.path_loss_reference import semantic_path_loss_reference

AVERAGES = ("per_sample", "pooled")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_hierarchy(ks: list[int], dim: int, num_samples: int, seed: int) -> PrototypeHierarchy:
    g = torch.Generator().manual_seed(seed)
    centroids = [F.normalize(torch.randn(k, dim, generator=g), dim=1) for k in ks]
    parents = [torch.randint(ks[lvl + 1], (ks[lvl],), generator=g) for lvl in range(len(ks) - 1)]
    assignments = [torch.randint(ks[0], (num_samples,), generator=g)]
    for p in parents:
        assignments.append(p[assignments[-1]])
    return PrototypeHierarchy(
        version=1,
        centroids=tuple(centroids),
        parents=tuple(parents),
        assignments=tuple(assignments),
        densities=tuple(torch.full((k,), 0.2) for k in ks),
    )


def random_z(h: PrototypeHierarchy, batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1000)
    return [
        F.normalize(torch.randn(batch, h.dim, generator=g), dim=1).requires_grad_()
        for _ in range(h.num_levels)
    ]


def loss_and_grads(fn, z, index, h, m, seed, neg_average="per_sample"):
    loss = fn(z, index, h, m, torch.Generator().manual_seed(seed), neg_average=neg_average)
    return loss.detach(), torch.autograd.grad(loss, z)


def assert_matches_reference(z, index, h, m, seed, neg_average):
    fast, fast_grads = loss_and_grads(semantic_path_loss, z, index, h, m, seed, neg_average)
    ref, ref_grads = loss_and_grads(
        semantic_path_loss_reference, z, index, h, m, seed, neg_average
    )
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for gf, gr in zip(fast_grads, ref_grads, strict=True):
        assert gr.abs().sum() > 0
        torch.testing.assert_close(gf, gr, atol=1e-5, rtol=1e-5)
    return fast, fast_grads


@pytest.mark.parametrize("ks", [[7], [9, 4], [12, 6, 3], [16, 8, 4, 2]])
@pytest.mark.parametrize("num_neg", [0, 1, 50])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("neg_average", AVERAGES)
def test_fast_loss_and_gradients_match_reference(ks, num_neg, seed, neg_average):
    h = random_hierarchy(ks, dim=8, num_samples=40, seed=seed)
    z = random_z(h, batch=6, seed=seed)
    index = torch.randperm(40, generator=torch.Generator().manual_seed(seed))[:6]
    fast, _ = assert_matches_reference(z, index, h, num_neg, seed, neg_average)
    assert fast.item() > 0


def near_positive_z(h, index, margin, seed=0):
    """Each level's ``z`` a small step off its positive prototype (cosine ~ 1 - margin)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lvl in range(h.num_levels):
        c = h.centroids[lvl][h.assignments[lvl][index]]
        noise = torch.randn(c.shape, generator=g)
        noise = noise - (noise * c).sum(1, keepdim=True) * c  # orthogonal to c
        step = F.normalize(noise, dim=1) * (2 * margin) ** 0.5
        out.append(F.normalize(c + step, dim=1).requires_grad_())
    return out


@pytest.mark.parametrize("neg_average", AVERAGES)
def test_false_negatives_are_masked(neg_average):
    # Two level-0 clusters under one root: about half of the negatives are the positive path.
    h = random_hierarchy([2, 1], dim=8, num_samples=10, seed=3)
    index = torch.arange(6)
    pos0 = h.assignments[0][index]
    # z sits next to its positive prototypes (cos ~ 1 - 1e-3, off the clamp boundary): p_pos is
    # close to 1, so an unmasked false negative would add -log(1 - p_pos + eps) >= 6.2.
    z = near_positive_z(h, index, margin=1e-3)
    neg = sample_negative_paths(h, 6, 50, torch.Generator().manual_seed(0), "cpu")
    num_false = (neg == pos0[:, None]).sum(1)
    assert int(num_false.sum()) > 0 and bool((num_false < 50).all())
    assert len(num_false.unique()) > 1  # the per-sample and pooled averages differ here
    fast, _ = assert_matches_reference(z, index, h, 50, 0, neg_average)
    assert torch.isfinite(fast) and fast < 2.0
    # Unmasked, the false negatives alone would add >= num_false * 6.2 / (2 * 300) to the loss.
    assert fast < int(num_false.sum()) * 6.0 / (2 * neg.numel())


def test_per_sample_and_pooled_averages_differ_with_false_negatives():
    # Small K_0: the number of true negatives varies per sample, so the two means differ.
    h = random_hierarchy([3, 2], dim=8, num_samples=30, seed=1)
    z = random_z(h, batch=8, seed=1)
    index = torch.arange(8)
    gen = torch.Generator
    per = semantic_path_loss(z, index, h, 10, gen().manual_seed(0), neg_average="per_sample")
    pooled = semantic_path_loss(z, index, h, 10, gen().manual_seed(0), neg_average="pooled")
    assert abs(per.item() - pooled.item()) > 1e-3
    with pytest.raises(ValueError, match="hirl.neg_average must be one of"):
        semantic_path_loss(z, index, h, 10, neg_average="mean")


def test_gradient_survives_cosines_rounded_past_one():
    # z on its prototypes can give a cosine of 1 + 1 ulp on one CPU and 1 - 1 ulp on another;
    # the value is clamped but the gradient must be the unclamped (official) one on both. Put
    # z a margin (1e-6, far above rounding) past the boundary so this holds on every machine.
    h = random_hierarchy([2, 1], dim=8, num_samples=10, seed=3)
    index = torch.arange(6)
    z = [
        (h.centroids[lvl][h.assignments[lvl][index]] * (1 + 1e-6)).requires_grad_()
        for lvl in range(2)
    ]
    with torch.no_grad():
        assert bool(((z[0] * h.centroids[0][h.assignments[0][index]]).sum(1) > 1).all())
    for neg_average in AVERAGES:
        loss, _ = assert_matches_reference(z, index, h, 50, 0, neg_average)
        assert torch.isfinite(loss)


@pytest.mark.parametrize("neg_average", AVERAGES)
def test_all_negatives_false_gives_half_positive_loss(neg_average):
    h = random_hierarchy([1], dim=8, num_samples=10, seed=0)
    z = random_z(h, batch=5, seed=0)
    index = torch.arange(5)
    positive_only = semantic_path_loss(z, index, h, 0)
    with_negs = semantic_path_loss(
        z, index, h, 20, torch.Generator().manual_seed(0), neg_average=neg_average
    )
    torch.testing.assert_close(with_negs, positive_only / 2)
    ref = semantic_path_loss_reference(
        z, index, h, 20, torch.Generator().manual_seed(0), neg_average=neg_average
    )
    torch.testing.assert_close(with_negs, ref)


def test_runs_in_float32_under_autocast():
    # bf16 autocast (CPU) would round each cosine to ~3 significant digits; near the positive
    # prototypes that moves -log(p + eps) and -log(1 - p + eps) by far more than 1e-5.
    h = random_hierarchy([40, 8, 2], dim=32, num_samples=60, seed=6)
    index = torch.arange(0, 60, 3)
    z = near_positive_z(h, index, margin=1e-3, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (z[0] @ h.centroids[0].T).dtype == torch.bfloat16  # autocast is active here
        loss = semantic_path_loss(z, index, h, 30, torch.Generator().manual_seed(0))
    # Backward outside the autocast region, as the training loop does (PyTorch's AMP recipe).
    grads = torch.autograd.grad(loss, z)
    assert loss.dtype == torch.float32
    ref = semantic_path_loss_reference(z, index, h, 30, torch.Generator().manual_seed(0))
    ref_grads = torch.autograd.grad(ref, z)
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_loss_decreases_towards_positive_prototypes():
    h = random_hierarchy([20, 6, 2], dim=16, num_samples=50, seed=5)
    index = torch.arange(0, 50, 5)
    z0 = random_z(h, batch=10, seed=5)
    targets = [h.centroids[lvl][h.assignments[lvl][index]] for lvl in range(3)]

    def loss_at(t: float, num_neg: int) -> float:
        z = [
            F.normalize((1 - t) * a.detach() + t * c, dim=1)
            for a, c in zip(z0, targets, strict=True)
        ]
        return semantic_path_loss(z, index, h, num_neg, torch.Generator().manual_seed(0)).item()

    pos_losses = [loss_at(t, 0) for t in (0.0, 0.3, 0.6, 0.9, 1.0)]
    assert all(a > b for a, b in zip(pos_losses, pos_losses[1:], strict=False))
    assert pos_losses[-1] < 1e-4
    assert loss_at(1.0, 20) < loss_at(0.0, 20)

    # And plain gradient descent on z lowers the full loss.
    z = [a.detach().clone().requires_grad_() for a in z0]
    opt = torch.optim.SGD(z, lr=0.5)
    first = None
    for _ in range(20):
        zn = [F.normalize(a, dim=1) for a in z]
        loss = semantic_path_loss(zn, index, h, 20, torch.Generator().manual_seed(0))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_path_prototypes():
    batch, num_neg, dim = 32, 1000, 256
    h = random_hierarchy([3000, 1000, 100], dim=dim, num_samples=500, seed=0)
    z = random_z(h, batch=batch, seed=0)
    index = torch.arange(batch)
    with _LargestTensor() as probe:
        loss = semantic_path_loss(z, index, h, num_neg, torch.Generator().manual_seed(0))
        loss.backward()
    # A gather-the-centroids formulation builds (B, M, D) per level = 8.2M elements; ours peaks at
    # the level-0 centroid table / (B, K_0) similarities.
    assert probe.largest <= max(3000 * dim, batch * 3000)
    assert probe.largest < batch * num_neg * dim // 8
    assert torch.isfinite(loss) and all(a.grad is not None for a in z)


def test_prototypes_get_no_gradient_and_half_inputs_upcast():
    h = random_hierarchy([10, 3], dim=8, num_samples=20, seed=2)
    trainable = PrototypeHierarchy(
        version=0,
        centroids=tuple(c.clone().requires_grad_() for c in h.centroids),
        parents=h.parents,
        assignments=h.assignments,
        densities=h.densities,
    )
    z = random_z(h, batch=4, seed=2)
    index = torch.tensor([0, 5, 9, 19])
    semantic_path_loss(z, index, trainable, 10, torch.Generator().manual_seed(0)).backward()
    assert all(c.grad is None for c in trainable.centroids)
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in z)

    z_half = [a.detach().half() for a in z]
    loss_half = semantic_path_loss(z_half, index, h, 10, torch.Generator().manual_seed(0))
    loss_upcast = semantic_path_loss(
        [a.float() for a in z_half], index, h, 10, torch.Generator().manual_seed(0)
    )
    assert loss_half.dtype == torch.float32
    torch.testing.assert_close(loss_half, loss_upcast)


def test_negatives_follow_the_generator():
    h = random_hierarchy([50, 10], dim=8, num_samples=20, seed=4)
    z = random_z(h, batch=4, seed=4)
    index = torch.arange(4)

    def run(seed):
        return semantic_path_loss(z, index, h, 5, torch.Generator().manual_seed(seed))

    assert run(1).item() == run(1).item()
    assert run(1).item() != run(2).item()
    paths = sample_negative_paths(h, 4, 300, torch.Generator().manual_seed(0), "cpu")
    assert paths.shape == (4, 300) and paths.dtype == torch.int64
    assert paths.min() >= 0 and paths.max() < 50 and len(paths.unique()) > 40


def test_rejects_mismatched_inputs():
    h = random_hierarchy([6, 2], dim=8, num_samples=10, seed=0)
    z = random_z(h, batch=3, seed=0)
    with pytest.raises(ValueError, match="2-level"):
        semantic_path_loss(z[:1], torch.arange(3), h, 2)
    with pytest.raises(ValueError, match="projection dim"):
        semantic_path_loss([torch.zeros(3, 4), torch.zeros(3, 4)], torch.arange(3), h, 2)
    with pytest.raises(ValueError, match="index"):
        semantic_path_loss(z, torch.arange(4), h, 2)
    with pytest.raises(ValueError, match="neg_average"):
        semantic_path_loss(z, torch.arange(3), h, 2, neg_average="batch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    h = random_hierarchy([30, 8, 2], dim=16, num_samples=64, seed=0)
    z = random_z(h, batch=16, seed=0)
    index = torch.arange(16)
    cpu = semantic_path_loss(z, index, h, 40, torch.Generator().manual_seed(0))
    z_cuda = [a.detach().cuda().requires_grad_() for a in z]
    cuda = semantic_path_loss(
        z_cuda, index.cuda(), h.to("cuda"), 40, torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(cuda.cpu(), cpu.detach(), atol=1e-5, rtol=1e-5)


def test_sampled_cosines_ignore_whatever_memory_they_are_given(monkeypatch):
    # K >= 16 (1 + M): the CPU forward takes the sampled-matmul path. Its value slots must not
    # leak into the result: with uninitialised memory holding NaN bit patterns the loss was NaN
    # at random (sampled_addmm computes beta * values even for beta = 0).
    h = random_hierarchy([400, 40, 6], 16, num_samples=64, seed=0)
    z = random_z(h, 8, seed=0)
    index = torch.arange(8)
    clean = semantic_path_loss(z, index, h, 20, torch.Generator().manual_seed(0))
    original = torch.Tensor.new_empty

    def poisoned(self, *args, **kwargs):
        return original(self, *args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
    loss = semantic_path_loss(z, index, h, 20, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(t.grad).all() for t in z)
    torch.testing.assert_close(loss.detach(), clean.detach())


def test_leaf_replaces_the_stored_path_with_its_parents():
    """iter_wise_assignment: a given level-0 cluster acts as if the samples were assigned to it."""
    import dataclasses

    h = random_hierarchy([12, 6, 3], 8, 40, seed=3)
    z = random_z(h, 10, seed=3)
    index = torch.arange(10, 20)
    leaf = torch.randint(12, (10,), generator=torch.Generator().manual_seed(9))
    reassigned = [h.assignments[0].clone()]
    reassigned[0][index] = leaf
    for p in h.parents:
        reassigned.append(p[reassigned[-1]])
    moved = dataclasses.replace(h, assignments=tuple(reassigned))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    expected = semantic_path_loss_reference(z, index, moved, 20, g())
    got = semantic_path_loss(z, index, h, 20, g(), leaf=leaf)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, semantic_path_loss(z, index, h, 20, g()))
    with pytest.raises(ValueError, match="leaf has shape"):
        semantic_path_loss(z, index, h, 20, leaf=leaf[:3])
