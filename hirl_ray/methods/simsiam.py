"""SimSiam (Chen & He, CVPR 2021): Siamese networks with a predictor and stop-gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hirl_ray.methods.base import MethodOutput, ProjectorConfig, SSLMethod, register_method
from hirl_ray.models.heads import mlp


def negative_cosine_loss(p: Tensor, z: Tensor) -> Tensor:
    """D(p, z) = −cos(p, stopgrad(z)) averaged over the batch (SimSiam Eq. 1 and 3)."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


@dataclass(frozen=True)
class SimSiamConfig(ProjectorConfig):
    """``method:`` keys of SimSiam (the predictor's hidden width is ``hidden_dim // 4``)."""

    name: str = "simsiam"


@register_method
class SimSiam(SSLMethod):
    """SimSiam: 3-layer projector ending in BN, bottleneck predictor, symmetric loss.

    L = ½·D(p₁, z₂) + ½·D(p₂, z₁) (SimSiam Eq. 4). The predictor's hidden width is
    ``hidden_dim // 4``, the bottleneck of SimSiam Sec. 4.4 (2048 → 512 → 2048).
    No target network and no negatives, so nothing crosses workers.
    """

    name: ClassVar[str] = "simsiam"
    Config = SimSiamConfig

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: SimSiamConfig) -> None:
        super().__init__(backbone, feat_dim, cfg)
        self.projector = mlp(feat_dim, cfg.hidden_dim, cfg.proj_dim, num_layers=3, last_bn=True)
        self.predictor = mlp(cfg.proj_dim, max(1, cfg.hidden_dim // 4), cfg.proj_dim)

    def forward(self, views: list[Tensor]) -> MethodOutput:
        """Symmetric negative cosine between each view's prediction and the other's projection."""
        self._check_views(views)
        b = views[0].shape[0]
        h = self.backbone(torch.cat(views))
        z = self.projector(h)
        p = self.predictor(z)
        loss = 0.5 * (negative_cosine_loss(p[:b], z[b:]) + negative_cosine_loss(p[b:], z[:b]))
        return MethodOutput(loss=loss, embedding=h[:b], projection=z[:b])

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """The online encoder incl. projector, as official HIRL-SimSiam's ``forward_feature``."""
        return self.backbone, self.projector
