"""A slow, literal re-statement of HIRL's semantic path loss (Eq. 4-6) for the tests.

It shares no code with :mod:`hirl_ray.losses.semantic_path` on purpose: Python loops over samples,
negative paths and levels, paths followed one parent hop at a time, float64 arithmetic, no
clamping, and the official code's averages (``hirl/pipelines/hirl.py``):

* per sample (official): ``neg_b = sum_j mask_bj * t_bj / (sum_j mask_bj + eps)`` and
  ``L = mean_b (pos_b + neg_b) / 2``;
* pooled: ``L = (mean_b pos_b + mean_{true negatives} t_bj) / 2``.

The only contract with the loss is how negatives are drawn: ``M`` level-0 starts per sample,
``torch.randint(K_0, (B, M), generator=generator)`` on the (CPU) generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hirl_ray.hierarchy import PrototypeHierarchy

EPS = 1e-6  # the official HIRL eps


def _path_probability(
    z: Sequence[Tensor], b: int, path: list[int], h: PrototypeHierarchy
) -> Tensor:
    p = torch.ones((), dtype=torch.float64)
    for level, node in enumerate(path):
        c = h.centroids[level][node].detach().cpu().double()
        cos = torch.dot(z[level][b].cpu().double(), c)
        p = p * (cos + 1) / 2
    return p


def semantic_path_loss_reference(
    z: Sequence[Tensor],
    index: Tensor,
    h: PrototypeHierarchy,
    num_neg_paths: int,
    generator: torch.Generator | None = None,
    neg_average: str = "per_sample",
) -> Tensor:
    """Eq. 4-6 sample by sample; returns a float32 scalar (computed in float64)."""
    batch, k0 = z[0].shape[0], h.centroids[0].shape[0]
    starts = torch.randint(k0, (batch, num_neg_paths), generator=generator)
    pos_terms: list[Tensor] = []
    neg_per_sample: list[Tensor] = []
    all_negs: list[Tensor] = []
    for b in range(batch):
        sample = int(index[b])
        pos_path = [int(h.assignments[level][sample]) for level in range(len(h.centroids))]
        pos_terms.append(-torch.log(_path_probability(z, b, pos_path, h) + EPS))
        total, count = torch.zeros((), dtype=torch.float64), 0
        for m in range(num_neg_paths):
            node = int(starts[b, m])
            path = [node]
            for parent in h.parents:
                node = int(parent[node])
                path.append(node)
            if path == pos_path:  # a false negative: masked out
                continue
            term = -torch.log(1 - _path_probability(z, b, path, h) + EPS)
            total, count = total + term, count + 1
            all_negs.append(term)
        neg_per_sample.append(total / (count + EPS))
    pos = torch.stack(pos_terms)
    if num_neg_paths == 0:
        return pos.mean().float()
    if neg_average == "per_sample":
        return ((pos + torch.stack(neg_per_sample)) / 2).mean().float()
    neg = torch.stack(all_negs).mean() if all_negs else torch.zeros((), dtype=torch.float64)
    return ((pos.mean() + neg) / 2).float()
