"""SimSiam (Chen & He, CVPR 2021): Siamese networks with a predictor and stop-gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from hirl_ray.losses.regression import negative_cosine_loss
from hirl_ray.methods.base import MethodOutput, ProjectorConfig, SSLMethod, register_method
from hirl_ray.models.heads import mlp
from hirl_ray.models.multicrop import forward_by_resolution


@dataclass(frozen=True)
class SimSiamConfig(ProjectorConfig):
    """``method:`` keys of SimSiam (the predictor's hidden width is ``hidden_dim // 4``).

    ``fix_pred_lr``: the predictor keeps the base learning rate ``train.lr`` instead of
    following the cosine schedule (official ``--fix-pred-lr``; SimSiam Sec. 4.2: a predictor
    whose lr does not decay trains slightly better). On by default, as in the official HIRL
    and SimSiam configs (``fix_pred_lr: True``); ``false`` lets the predictor follow the schedule.
    """

    name: str = "simsiam"
    fix_pred_lr: bool = True


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
        self._check_views(views, 2)
        b = views[0].shape[0]
        h = forward_by_resolution(self.backbone, views)
        z = self.projector(h)
        p = self.predictor(z)
        loss = 0.5 * (negative_cosine_loss(p[:b], z[b:]) + negative_cosine_loss(p[b:], z[:b]))
        return MethodOutput(loss=loss, embedding=h[:b], projection=z[:b])

    def param_groups(self) -> list[dict[str, Any]]:
        """One group, or with ``fix_pred_lr`` the encoder and the fixed-lr predictor."""
        if not self.cfg.fix_pred_lr:
            return super().param_groups()
        predictor = {id(p) for p in self.predictor.parameters()}
        encoder = [p for p in self.parameters() if p.requires_grad and id(p) not in predictor]
        return [{"params": encoder},
                {"params": [p for p in self.predictor.parameters() if p.requires_grad],
                 "fixed_lr": True}]

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """The online encoder incl. projector, as official HIRL-SimSiam's ``forward_feature``."""
        return self.backbone, self.projector
