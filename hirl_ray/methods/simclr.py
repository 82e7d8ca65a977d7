"""SimCLR (Chen et al., ICML 2020): NT-Xent over two augmented views."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hirl_ray.config import check_positive
from hirl_ray.methods.base import MethodOutput, ProjectorConfig, SSLMethod, register_method
from hirl_ray.methods.distributed import gather, rank
from hirl_ray.models.heads import mlp


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float, all_z1: Tensor | None = None,
                 all_z2: Tensor | None = None, offset: int = 0) -> Tensor:
    """Normalised temperature-scaled cross entropy (SimCLR Eq. 1), averaged over the anchors.

    ℓ(i, j) = −log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ), where j is the other
    view of i and the 2N−2 other samples of the (global) batch are the negatives.

    Args:
        z1: ``(B, D)`` projections of view 1, the anchors (need not be normalised).
        z2: ``(B, D)`` projections of view 2.
        temperature: τ > 0.
        all_z1: ``(N, D)`` view-1 projections of the whole batch over all ranks (rows
            ``offset:offset+B`` are ``z1``); ``None``: ``z1`` itself (N = B).
        all_z2: Same for view 2.
        offset: Row of ``z1[0]`` in ``all_z1``.

    Returns:
        Scalar loss, the mean over the ``2B`` anchors ``z1``, ``z2``.
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    if all_z1 is None or all_z2 is None:
        all_z1, all_z2 = z1, z2
    n = all_z1.shape[0]
    c = F.normalize(torch.cat([all_z1, all_z2]).float(), dim=1)
    logits = z @ c.T / temperature
    rows = torch.arange(2 * b, device=z.device)
    own = torch.cat([offset + rows[:b], n + offset + rows[:b]])  # anchor i's column in c
    # Exclude self-similarity from the denominator (k ≠ i).
    logits[rows, own] = float("-inf")
    targets = torch.cat([own[b:], own[:b]])  # the other view of the same image
    return F.cross_entropy(logits, targets)


@dataclass(frozen=True)
class SimCLRConfig(ProjectorConfig):
    """``method:`` keys of SimCLR; ``temperature`` is NT-Xent's τ."""

    name: str = "simclr"
    temperature: float = 0.2

    def check(self, where: str) -> None:
        super().check(where)
        check_positive(self, where, "temperature")


@register_method
class SimCLR(SSLMethod):
    """SimCLR: backbone → MLP projector → NT-Xent with negatives from every rank.

    Under DDP the projections of both views are all-gathered across ranks with a
    gradient-preserving gather (:func:`~hirl_ray.methods.distributed.gather`): each local
    anchor is contrasted with the other ``2·B_global − 2`` samples of the global batch, as in
    SimCLR (Sec. 2 and Appendix B.1, large global batches), instead of ``2·B_local − 2``. The
    loss is the mean over the local anchors; DDP's gradient average then makes the gradients
    equal those of one worker on the global batch. BN statistics are global only with
    ``model.sync_bn`` (SimCLR's "global BN").
    """

    name: ClassVar[str] = "simclr"
    Config = SimCLRConfig

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: SimCLRConfig) -> None:
        super().__init__(backbone, feat_dim, cfg)
        self.projector = mlp(feat_dim, cfg.hidden_dim, cfg.proj_dim)

    def forward(self, views: list[Tensor]) -> MethodOutput:
        """NT-Xent between the projections of the two views, negatives from all ranks."""
        self._check_views(views)
        b = views[0].shape[0]
        # One backbone pass over both views: BN sees the joint batch, as in SimCLR.
        h = self.backbone(torch.cat(views))
        z = self.projector(h)
        z1, z2 = z[:b], z[b:]
        loss = nt_xent_loss(z1, z2, self.cfg.temperature, gather(z1), gather(z2),
                            offset=rank() * b)
        return MethodOutput(loss=loss, embedding=h[:b], projection=z1)

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """No target network: the online backbone and projector are clustered."""
        return self.backbone, self.projector
