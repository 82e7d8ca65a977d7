"""BYOL (Grill et al., NeurIPS 2020): online predictor regresses an EMA target's projection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from hirl_ray.config import check_fraction
from hirl_ray.losses.regression import byol_loss
from hirl_ray.methods.base import (
    MethodOutput,
    ProjectorConfig,
    SSLMethod,
    ema_update,
    frozen_copy,
    register_method,
)
from hirl_ray.models.heads import mlp
from hirl_ray.models.multicrop import forward_by_resolution
from hirl_ray.schedules import cosine_momentum


@dataclass(frozen=True)
class BYOLConfig(ProjectorConfig):
    """``method:`` keys of BYOL; ``base_momentum`` is τ_base of the target's cosine schedule."""

    name: str = "byol"
    base_momentum: float = 0.99

    def check(self, where: str) -> None:
        super().check(where)
        check_fraction(f"{where}.base_momentum", self.base_momentum)


@register_method
class BYOL(SSLMethod):
    """BYOL: online backbone + projector + predictor; target backbone + projector by EMA.

    The loss is symmetrised by summing both directions, L + L̃ (BYOL Sec. 3.1). The target
    decay follows the cosine schedule τ = 1 − (1 − τ_base)(cos(π·progress) + 1)/2 from
    ``cfg.base_momentum`` to 1 (BYOL Sec. 3.2), applied in :meth:`update_target` after every
    optimiser step. No negatives, so nothing crosses workers; the target's parameters are
    identical on every rank because the online weights are (DDP) and the update is
    deterministic.
    """

    name: ClassVar[str] = "byol"
    Config = BYOLConfig

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: BYOLConfig) -> None:
        super().__init__(backbone, feat_dim, cfg)
        self.projector = mlp(feat_dim, cfg.hidden_dim, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim)
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)

    def forward(self, views: list[Tensor]) -> MethodOutput:
        """Each view's online prediction regresses the other view's target projection."""
        self._check_views(views, 2)
        b = views[0].shape[0]
        h = forward_by_resolution(self.backbone, views)
        z = self.projector(h)
        p = self.predictor(z)
        with torch.no_grad():
            zt = self.target_projector(forward_by_resolution(self.target_backbone, views))
        loss = byol_loss(p[:b], zt[b:]) + byol_loss(p[b:], zt[:b])
        return MethodOutput(loss=loss, embedding=h[:b], projection=z[:b])

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """The target (EMA) network, the analogue of MoCo's key encoder."""
        return self.target_backbone, self.target_projector

    @torch.no_grad()
    def update_target(self, progress: float) -> None:
        """EMA of the online network with BYOL's cosine-increasing decay."""
        tau = cosine_momentum(self.cfg.base_momentum, progress)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)
