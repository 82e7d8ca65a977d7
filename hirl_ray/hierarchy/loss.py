"""Semantic path discrimination loss (HIRL, Xu et al. 2022, Sec. 3.2, Eq. 4-6).

A path is one prototype per level, root-ward through the parent maps. For a sample with
level-``l`` embeddings ``z_l`` the path probability is (Eq. 4)

    p(path) = prod_l (cos(z_l, c_l[path_l]) + 1) / 2,

the positive path is the sample's own cluster chain, and ``M`` negative paths start at
level-0 clusters drawn uniformly and follow the parent maps. The loss (Eq. 5-6) is

    L = 1/2 * ( mean_b -log(p_pos + eps)  +  mean_{true negs} -log(1 - p_neg + eps) ),

where a "true" negative differs from the positive path at some level; with ``M = 0`` only the
positive term is used. ``z_l`` must already be L2-normalised (the projection head does that).
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


def _check(z: Sequence[Tensor], index: Tensor, h: PrototypeHierarchy, num_neg_paths: int) -> None:
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


def _combine(pos_terms: Tensor, neg_terms: Tensor | None, neg_mask: Tensor | None) -> Tensor:
    """Eq. 6: average positives, average true negatives (0 if none), then halve the sum."""
    pos_loss = pos_terms.mean()
    if neg_terms is None or neg_mask is None:
        return pos_loss
    neg_loss = (neg_terms * neg_mask).sum() / neg_mask.sum().clamp(min=1)
    return (pos_loss + neg_loss) / 2


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
                z.new_empty(batch * paths),
                size=(batch, c.shape[0]),
                check_invariants=False,
            )
        return torch.sparse.sampled_addmm(pattern, z, c.T, beta=0.0).values().view(batch, paths)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        c, nodes = ctx.saved_tensors
        grad = grad.contiguous()
        if ctx.bag:
            dz = torch.nn.functional.embedding_bag(nodes, c, per_sample_weights=grad, mode="sum")
        else:
            dense = grad.new_zeros(grad.shape[0], c.shape[0]).scatter_add_(1, nodes, grad)
            dz = dense @ c
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
    eps: float = 1e-8,
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
            computed in float32).
        index: ``(B,)`` dataset indices of the samples (rows of ``h.assignments``).
        h: The prototype hierarchy.
        num_neg_paths: Negative paths per sample ``M`` (``hirl.num_neg_paths``); 0 = positive only.
        generator: Random source for the negatives (see :func:`sample_negative_paths`).
        eps: Keeps the logs finite.

    Returns:
        Scalar loss.
    """
    _check(z, index, h, num_neg_paths)
    device = z[0].device
    batch = z[0].shape[0]
    rows = index.to(h.assignments[0].device, torch.long)
    positive = [a[rows].to(device) for a in h.assignments]  # (B,) node per level
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
        # Clamp: rounding can push a cosine of unit vectors past 1, and 1 - p must stay >= 0.
        p = p * ((_path_cosines(z[level].float(), centroids, nodes) + 1) / 2).clamp(0, 1)
    pos_terms = -torch.log(p[:, 0] + eps)
    if neg_start is None:
        return _combine(pos_terms, None, None)
    # Zero the probability of masked (false) negatives before the log so that neither the value
    # nor the gradient of log(1 - p + eps) can blow up on them, even with eps = 0.
    p_neg = torch.where(differs, p[:, 1:], torch.zeros_like(p[:, 1:]))
    neg_terms = -torch.log(1 - p_neg + eps)
    return _combine(pos_terms, neg_terms, differs.float())


def _path_probability(
    z: Sequence[Tensor], b: int, path: list[int], h: PrototypeHierarchy
) -> Tensor:
    p = torch.ones((), device=z[0].device)
    for level, node in enumerate(path):
        c = h.centroids[level][node].to(device=z[0].device, dtype=torch.float32)
        cos = torch.dot(z[level][b].float(), c)
        p = p * ((cos + 1) / 2).clamp(0, 1)
    return p


def semantic_path_loss_reference(
    z: Sequence[Tensor],
    index: Tensor,
    h: PrototypeHierarchy,
    num_neg_paths: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Slow, literal Eq. 4-6: Python loops over samples, paths and levels. For tests only.

    Uses :func:`sample_negative_paths` exactly like :func:`semantic_path_loss`, so the two agree
    for identically seeded generators; paths are followed through ``h.parents`` one hop at a time.
    """
    _check(z, index, h, num_neg_paths)
    batch = z[0].shape[0]
    neg_start = sample_negative_paths(h, batch, num_neg_paths, generator, "cpu")
    pos_terms, neg_terms = [], []
    for b in range(batch):
        sample = int(index[b])
        pos_path = [int(h.assignments[level][sample]) for level in range(h.num_levels)]
        pos_terms.append(-torch.log(_path_probability(z, b, pos_path, h) + eps))
        for m in range(num_neg_paths):
            node = int(neg_start[b, m])
            path = [node]
            for parent in h.parents:
                node = int(parent[node])
                path.append(node)
            if path != pos_path:
                neg_terms.append(-torch.log(1 - _path_probability(z, b, path, h) + eps))
    pos = torch.stack(pos_terms)
    if num_neg_paths == 0:
        return _combine(pos, None, None)
    if not neg_terms:
        return _combine(pos, torch.zeros(1, device=pos.device), torch.zeros(1, device=pos.device))
    neg = torch.stack(neg_terms)
    return _combine(pos, neg, torch.ones_like(neg))
