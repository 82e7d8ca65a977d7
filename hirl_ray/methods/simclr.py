"""SimCLR (Chen et al., ICML 2020): NT-Xent over two augmented views."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hirl_ray.config import MethodConfig
from hirl_ray.methods.base import MethodOutput, SSLMethod
from hirl_ray.models.heads import mlp


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """Normalised temperature-scaled cross entropy (SimCLR Eq. 1), averaged over all 2B anchors.

    ℓ(i, j) = −log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ), where j is the other
    view of i and the 2B−2 other samples of the batch are the negatives.

    Args:
        z1: ``(B, D)`` projections of view 1 (need not be normalised).
        z2: ``(B, D)`` projections of view 2.
        temperature: τ > 0.

    Returns:
        Scalar loss.
    """
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    # Exclude self-similarity from the denominator (k ≠ i).
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, targets)


class SimCLR(SSLMethod):
    """SimCLR: backbone → MLP projector → NT-Xent.

    Negatives are the other samples of the *local* (per-worker) batch only: there is no
    all-gather across Ray Train workers. This keeps the loss free of collectives (whose
    gradients are easy to get wrong, lightly #1528) at the cost of fewer negatives per anchor
    (2·B_local − 2 instead of 2·B_global − 2).
    """

    name: ClassVar[str] = "simclr"

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: MethodConfig) -> None:
        super().__init__(backbone, feat_dim, cfg)
        self.projector = mlp(feat_dim, cfg.hidden_dim, cfg.proj_dim)

    def forward(self, views: list[Tensor]) -> MethodOutput:
        """NT-Xent between the projections of the two views."""
        self._check_views(views)
        b = views[0].shape[0]
        # One backbone pass over both views: BN sees the joint batch, as in SimCLR.
        h = self.backbone(torch.cat(views))
        z = self.projector(h)
        loss = nt_xent_loss(z[:b], z[b:], self.cfg.temperature)
        return MethodOutput(loss=loss, embedding=h[:b], projection=z[:b])

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """No target network: the online backbone and projector are clustered."""
        return self.backbone, self.projector
