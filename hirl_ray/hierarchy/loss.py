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


def semantic_path_loss(
    z: Sequence[Tensor],
    index: Tensor,
    h: PrototypeHierarchy,
    num_neg_paths: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Semantic path discrimination (HIRL Eq. 4-6), batched.

    Per level, one ``(B, K_l)`` matmul of ``z_l`` against all level-``l`` prototypes gives every
    node probability; positive and negative path entries are gathered from it by index, so memory
    is ``O(B * (K_l + M))`` and no ``(B, M, L, D)`` tensor of path prototypes is ever built.
    Prototypes are constants (no gradient). For speed, call ``h.to(device)`` once per rebuild.

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
    p_pos = torch.ones(batch, device=device)
    p_neg = torch.ones(batch, num_neg_paths, device=device)
    differs = torch.zeros(batch, num_neg_paths, dtype=torch.bool, device=device)
    for level in range(h.num_levels):
        centroids = h.centroids[level].to(device=device, dtype=torch.float32).detach()
        # Clamp: rounding can push a cosine of unit vectors past 1, and 1 - p must stay >= 0.
        prob = ((z[level].float() @ centroids.T + 1) / 2).clamp(0, 1)  # (B, K_l)
        p_pos = p_pos * prob.gather(1, positive[level][:, None]).squeeze(1)
        if neg_start is not None:
            nodes = ancestors[level].to(device)[neg_start]  # (B, M)
            p_neg = p_neg * prob.gather(1, nodes)
            differs |= nodes != positive[level][:, None]
    pos_terms = -torch.log(p_pos + eps)
    if neg_start is None:
        return _combine(pos_terms, None, None)
    # Zero the probability of masked (false) negatives before the log so that neither the value
    # nor the gradient of log(1 - p + eps) can blow up on them, even with eps = 0.
    p_neg = torch.where(differs, p_neg, torch.zeros_like(p_neg))
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
