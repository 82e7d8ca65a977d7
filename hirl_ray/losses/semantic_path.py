"""Semantic path discrimination loss (HIRL, Xu et al. 2022, Sec. 3.2, Eq. 4-6).

A path is one prototype per level, root-ward through the parent maps. For a sample with
level-``l`` embeddings ``z_l`` the path probability is (Eq. 4)

    p(path) = prod_l (cos(z_l, c_l[path_l]) + 1) / 2,

the positive path is the sample's own cluster chain, and ``M`` negative paths start at
level-0 clusters drawn uniformly and follow the parent maps. With ``T_b`` the true negatives of
sample ``b`` (paths that differ from its positive path at some level), the loss (Eq. 5-6) is,
with the official code's per-sample average (``neg_average="per_sample"``, the default),

    L = mean_b 1/2 * ( -log(p_pos_b + eps)  +  mean_{j in T_b} -log(1 - p_neg_bj + eps) ),

(0 for the second term when ``T_b`` is empty), or, ``neg_average="pooled"``, one mean over all
true negatives of the batch, ``1/2 * (mean_b -log(p_pos_b + eps) + mean_{b, j in T_b} ...)``.
The two agree when every sample has the same number of true negatives (large ``K_0``), and
differ when false negatives are frequent (small ``K_0``). With ``M = 0`` only the positive term
is used. ``eps = 1e-6`` as in the official code. ``z_l`` must already be L2-normalised (the
projection head does that). Everything runs in float32, also under autocast.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from hirl_ray.hierarchy.kmeans import PrototypeHierarchy


def sample_negative_paths(
    h: PrototypeHierarchy,
    batch: int,
    num_neg_paths: int,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> Tensor:
    """Draw negative path starts uniformly among the level-0 clusters (HIRL Sec. 3.2).

    Args:
        h: The hierarchy (only ``K_0`` is used).
        batch: Batch size ``B``.
        num_neg_paths: Negatives per sample ``M``.
        generator: Random source; sampling happens on the generator's device so a CPU generator
            gives the same paths whether the loss then runs on CPU or CUDA.
        device: Where the result goes.

    Returns:
        ``(B, M)`` int64 level-0 cluster ids; the rest of each path is ``h.ancestors()``.
    """
    sample_device = generator.device if generator is not None else torch.device(device)
    ids = torch.randint(
        h.num_clusters[0], (batch, num_neg_paths), generator=generator, device=sample_device
    )
    return ids.to(device)


#: ``neg_average`` choices: the official per-sample mean, or one mean over the batch's negatives.
NEG_AVERAGES = ("per_sample", "pooled")


def _check(
    z: Sequence[Tensor], index: Tensor, h: PrototypeHierarchy, num_neg_paths: int, neg_average: str
) -> None:
    if neg_average not in NEG_AVERAGES:
        raise ValueError(
            f"hirl.neg_average must be one of {', '.join(NEG_AVERAGES)}, got {neg_average!r}"
        )
    if len(z) != h.num_levels:
        raise ValueError(
            f"semantic_path_loss got {len(z)} embeddings for a {h.num_levels}-level "
            "hierarchy; pass one projection per level of hirl.num_clusters"
        )
    batch = z[0].shape[0]
    for level, zl in enumerate(z):
        if zl.ndim != 2 or zl.shape != (batch, h.dim):
            raise ValueError(
                f"semantic_path_loss z[{level}] has shape {tuple(zl.shape)}, expected "
                f"({batch}, {h.dim}); the projection dim must match the prototypes"
            )
    if index.shape != (batch,):
        raise ValueError(
            f"semantic_path_loss index has shape {tuple(index.shape)}, expected "
            f"({batch},): one dataset index per sample"
        )
    if num_neg_paths < 0:
        raise ValueError(f"hirl.num_neg_paths must be >= 0, got {num_neg_paths}")


def _combine(pos_terms: Tensor, neg_terms: Tensor | None, neg_mask: Tensor | None,
             neg_average: str) -> Tensor:
    """Eq. 6: halve positive + mean true-negative term (0 if none), per sample or pooled.

    ``pos_terms``: ``(B,)``; ``neg_terms``, ``neg_mask``: ``(B, M)`` (mask 1 = true negative).
    The per-sample mean divides by the count of true negatives (at least 1); the official
    ``/ (count + 1e-6)`` differs from it by a relative 1e-6 at most.
    """
    if neg_terms is None or neg_mask is None:
        return pos_terms.mean()
    masked = neg_terms * neg_mask
    if neg_average == "pooled":
        return (pos_terms.mean() + masked.sum() / neg_mask.sum().clamp(min=1)) / 2
    per_sample = masked.sum(dim=1) / neg_mask.sum(dim=1).clamp(min=1)
    return ((pos_terms + per_sample) / 2).mean()


#: CPU cost model for one level with ``K`` prototypes and ``J = 1 + M`` paths per sample, measured
#: with ``experiments/bench`` (one thread, 2-core EPYC VM). A dense ``z @ c.T`` GEMM costs ``B K D``
#: multiply-adds; gathering path prototypes streams ``B J`` rows of ``D`` floats, which costs about
#: as much as 13 multiply-adds per float for a sampled matmul (forward) and 2-5 for an
#: ``embedding_bag`` (backward). So the forward samples when ``K >= SAMPLED_FWD_RATIO * J`` and
#: the backward gathers when ``K >= BAG_BWD_RATIO * J``. ``SAMPLED_FWD_RATIO`` must stay >= 1:
#: ``sampled_addmm`` rejects rows with more entries than columns.
SAMPLED_FWD_RATIO = 16
BAG_BWD_RATIO = 2


class _PathCosines(torch.autograd.Function):
    """``out[b, j] = z[b] . c[nodes[b, j]]``, never building the ``(B, J, D)`` gathered rows.

    Forward: one dense ``(B, K)`` GEMM then a gather, or (``sampled``) a sampled dense-dense
    matmul computing only the ``B J`` needed dot products. Backward: the dense
    ``scatter(g) @ c``, or (``bag``) ``dz[b] = sum_j g[b, j] c[nodes[b, j]]`` as one
    ``embedding_bag``, which reads ``B J`` rows of ``c`` instead of multiplying all ``K``.
    The prototypes ``c`` get no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, z: Tensor, c: Tensor, nodes: Tensor, sampled: bool, bag: bool
    ) -> Tensor:
        ctx.save_for_backward(c, nodes)
        ctx.bag = bag
        if not sampled:
            return (z @ c.T).gather(1, nodes)
        batch, paths = nodes.shape
        crow = torch.arange(0, batch * paths + 1, paths, device=z.device)
        # Column indices are unsorted and may repeat within a row; sampled_addmm needs only one
        # value slot per entry, so skip the (costly) invariant checks. It requires J <= K.
        with warnings.catch_warnings():  # PyTorch warns that CSR support is "beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                crow,
                nodes.reshape(-1),
                # Zeros, not new_empty: sampled_addmm computes beta * values even for beta = 0,
                # and uninitialised memory holding a NaN bit pattern made the loss NaN at random.
                z.new_zeros(batch * paths),
                size=(batch, c.shape[0]),
                check_invariants=False,
            )
        return torch.sparse.sampled_addmm(pattern, z, c.T, beta=0.0).values().view(batch, paths)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        c, nodes = ctx.saved_tensors
        grad = grad.contiguous()
        # A custom backward runs under the autocast state of the caller of .backward(), not of
        # the forward: keep it in float32 like the forward.
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.bag:
                dz = torch.nn.functional.embedding_bag(
                    nodes, c, per_sample_weights=grad.float(), mode="sum"
                )
            else:
                dense = grad.new_zeros(grad.shape[0], c.shape[0]).scatter_add_(1, nodes, grad)
                dz = dense.float() @ c
        return dz, None, None, None, None


def _path_cosines(z: Tensor, centroids: Tensor, nodes: Tensor) -> Tensor:
    """``(B, J)`` cosines of ``z[b]`` with prototypes ``nodes[b, j]`` (rows of ``centroids``)."""
    k, paths = centroids.shape[0], nodes.shape[1]
    sampled, bag = k >= SAMPLED_FWD_RATIO * paths, k >= BAG_BWD_RATIO * paths
    # The cost model was measured on CPU; on GPUs the dense GEMM is cheap and CSR sampled matmul
    # with unsorted, repeated columns is not guaranteed, so they keep plain autograd.
    if z.device.type != "cpu" or not (sampled or bag):
        return (z @ centroids.T).gather(1, nodes)
    return _PathCosines.apply(z, centroids, nodes, sampled, bag)


def semantic_path_loss(
    z: Sequence[Tensor],
    index: Tensor,
    h: PrototypeHierarchy,
    num_neg_paths: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-6,
    neg_average: str = "per_sample",
    leaf: Tensor | None = None,
) -> Tensor:
    """Semantic path discrimination (HIRL Eq. 4-6), batched.

    Per level, the cosines of ``z_l`` with the ``1 + M`` path prototypes of every sample (its
    positive node and the level-``l`` nodes of its ``M`` negative paths) come either from one
    ``(B, K_l)`` matmul against all prototypes, gathered by index, or — on CPU, for levels with
    many more prototypes than paths (``SAMPLED_FWD_RATIO``; e.g. the paper's 30k level-0
    clusters with 1000 negatives) — from a sampled matmul computing only those ``B (1 + M)``
    dot products; the backward likewise gathers the rows it needs (``BAG_BWD_RATIO``). Memory is
    ``O(B (K_l + M))``: no ``(B, M, L, D)`` tensor of path prototypes is ever built. Prototypes
    are constants (no gradient). For speed, call ``h.to(device)`` once per rebuild.

    Args:
        z: ``L`` tensors ``(B, D)``, L2-normalised level-``l`` projections (any float dtype;
            computed in float32 with autocast disabled: in fp16/bf16 a cosine near 1 is off by
            up to 1e-3/4e-3, which ``-log(1 - p + eps)`` amplifies).
        index: ``(B,)`` dataset indices of the samples (rows of ``h.assignments``).
        h: The prototype hierarchy.
        num_neg_paths: Negative paths per sample ``M`` (``hirl.num_neg_paths``); 0 = positive only.
        generator: Random source for the negatives (see :func:`sample_negative_paths`).
        eps: Keeps the logs finite (official value 1e-6).
        neg_average: ``"per_sample"`` (official) or ``"pooled"``, see the module docstring.
        leaf: Optional ``(B,)`` level-0 clusters that replace the samples' stored ones; the
            positive path is then the leaf's chain of parents (official
            ``iter_wise_assignment``: each step re-assigns its batch to the nearest level-0
            prototype). ``None``: ``h.assignments`` at ``index``.

    Returns:
        Scalar loss.
    """
    _check(z, index, h, num_neg_paths, neg_average)
    if leaf is not None and leaf.shape != index.shape:
        raise ValueError(f"semantic_path_loss leaf has shape {tuple(leaf.shape)}, expected "
                         f"{tuple(index.shape)}: one level-0 cluster per sample")
    with torch.autocast(z[0].device.type, enabled=False):
        return _semantic_path_loss_fp32(
            [zl.float() for zl in z], index, h, num_neg_paths, generator, eps, neg_average, leaf
        )


def _factor(cos: Tensor) -> Tensor:
    """``(cos + 1) / 2`` clamped to [0, 1] in value but not in gradient.

    Rounding can push the cosine of unit vectors just past +-1, and ``1 - p`` must stay >= 0 for
    any ``eps``. A plain clamp would zero the gradient there: with ``z`` on its prototype the
    cosine lands at 1 +- 1 ulp depending on the CPU's kernels, so the gradient would be 0 on one
    machine and not on another. The official code does not clamp; its gradient is what we keep.
    """
    f = (cos + 1) / 2
    return f + (f.clamp(0, 1) - f).detach()


def _semantic_path_loss_fp32(
    z: list[Tensor],
    index: Tensor,
    h: PrototypeHierarchy,
    num_neg_paths: int,
    generator: torch.Generator | None,
    eps: float,
    neg_average: str,
    leaf: Tensor | None = None,
) -> Tensor:
    device = z[0].device
    batch = z[0].shape[0]
    if leaf is None:
        rows = index.to(h.assignments[0].device, torch.long)
        positive = [a[rows].to(device) for a in h.assignments]  # (B,) node per level
    else:
        leaf = leaf.to(h.parents[0].device if h.parents else device, torch.long)
        positive = [up[leaf].to(device) for up in h.ancestors()]
    neg_start, ancestors = None, h.ancestors() if num_neg_paths > 0 else ()
    if num_neg_paths > 0:
        neg_start = sample_negative_paths(h, batch, num_neg_paths, generator, device)
    # Column 0: the positive path; columns 1..M: the negative paths.
    p = torch.ones(batch, 1 + num_neg_paths, device=device)
    differs = torch.zeros(batch, num_neg_paths, dtype=torch.bool, device=device)
    for level in range(h.num_levels):
        nodes = positive[level][:, None]
        if neg_start is not None:
            neg = ancestors[level].to(device)[neg_start]  # (B, M)
            differs |= neg != nodes
            nodes = torch.cat([nodes, neg], dim=1)
        centroids = h.centroids[level].to(device=device, dtype=torch.float32).detach()
        p = p * _factor(_path_cosines(z[level], centroids, nodes))
    pos_terms = -torch.log(p[:, 0] + eps)
    if neg_start is None:
        return _combine(pos_terms, None, None, neg_average)
    # Zero the probability of masked (false) negatives before the log so that neither the value
    # nor the gradient of log(1 - p + eps) can blow up on them, even with eps = 0.
    p_neg = torch.where(differs, p[:, 1:], torch.zeros_like(p[:, 1:]))
    neg_terms = -torch.log(1 - p_neg + eps)
    return _combine(pos_terms, neg_terms, differs.float(), neg_average)
