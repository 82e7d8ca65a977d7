"""MoCo v3 (Chen, Xie & He, ICCV 2021): momentum encoder, predictor, symmetric in-batch InfoNCE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from hirl_ray.config import ConfigError, check_choice, check_fraction, check_positive
from hirl_ray.data.transforms import AUGMENTS, MultiViewTransform, multi_crop_transform
from hirl_ray.losses.mocov3 import mocov3_contrastive_loss
from hirl_ray.methods.base import (
    MethodOutput,
    ProjectorConfig,
    SSLMethod,
    ema_update,
    frozen_copy,
    register_method,
)
from hirl_ray.methods.distributed import gather_no_grad, rank
from hirl_ray.models.heads import mlp
from hirl_ray.models.vit import ViT
from hirl_ray.schedules import cosine_momentum

if TYPE_CHECKING:
    from hirl_ray.config import DataConfig, ExperimentConfig


@dataclass(frozen=True)
class MoCoV3Config(ProjectorConfig):
    """``method:`` keys of MoCo v3 (defaults: the official HIRL-MoCo v3 ViT-B/16 recipe)."""

    name: str = "mocov3"
    proj_dim: int = 256  # projector/predictor output (official ``dim``)
    hidden_dim: int = 4096  # projector/predictor hidden width (official ``mlp_dim``)
    # Projector Linear layers; null: 3 for ViTs, 2 for CNNs (official MoCo_ViT / MoCo_ResNet).
    proj_layers: int | None = None
    temperature: float = 0.2  # τ of the InfoNCE (MoCo v3: 0.2 for ViTs, 1.0 for ResNets)
    momentum: float = 0.99  # momentum encoder EMA: cosine from this to 1 (or constant)
    momentum_cosine: bool = True  # official ``moco_momentum_cosine``
    # ViTs: freeze the random patch embedding (MoCo v3 Sec. 5 "stop_grad_conv1"); the official
    # HIRL-MoCo v3 leaves it trainable (``random_patch_projection`` off).
    freeze_patch_embed: bool = False
    # ViTs: fixed 2-D sin-cos position embedding, as official MoCo v3 / HIRL (``sincos_pos_emb``).
    sincos_pos_embed: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area range of both random crops
    augment: str = "byol"  # byol: MoCo v3's asymmetric views (blur 1.0/0.1, solarise); simclr
    shape_keys = ("proj_dim", "hidden_dim", "proj_layers")

    def check(self, where: str) -> None:
        super().check(where)
        check_positive(self, where, "temperature")
        check_fraction(f"{where}.momentum", self.momentum)
        if self.proj_layers is not None and self.proj_layers < 1:
            raise ConfigError(f"{where}.proj_layers must be >= 1 or null (3 for ViTs, 2 for "
                              f"CNNs), got {self.proj_layers}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{where}.crop_scale must satisfy 0 < min <= max <= 1, "
                              f"got {list(self.crop_scale)}")
        check_choice(f"{where}.augment", self.augment, AUGMENTS)

    def check_experiment(self, cfg: ExperimentConfig) -> None:
        if self.freeze_patch_embed and not cfg.model.is_vit:
            raise ConfigError("method.freeze_patch_embed needs a ViT backbone (model.backbone: "
                              f"vit_tiny or vit_b_16), got {cfg.model.backbone}; set it to false")


def sincos_pos_embed(grid: int, dim: int) -> Tensor:
    """``(1, 1 + grid², dim)`` fixed 2-D sin-cos embedding, zeros for ``[CLS]`` (MoCo v3 Sec. 5).

    Token ``(row r, col c)``: ``[sin(rω), cos(rω), sin(cω), cos(cω)]``, ω_i = 10000^(−i/(dim/4)),
    as the official ``build_2d_sincos_position_embedding``.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs width % 4 == 0, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    r, c = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                          torch.arange(grid, dtype=torch.float32), indexing="ij")
    rw, cw = r.flatten()[:, None] * omega, c.flatten()[:, None] * omega
    pos = torch.cat([rw.sin(), rw.cos(), cw.sin(), cw.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pos])[None]


@register_method
class MoCoV3(SSLMethod):
    """MoCo v3: base encoder (backbone + projector) + predictor; momentum encoder by EMA.

    ``ctr(q1, k2) + ctr(q2, k1)`` (:func:`~hirl_ray.losses.mocov3_contrastive_loss`), ``q`` the
    predictor outputs, ``k`` the momentum encoder's (backbone + projector) of the other view.
    Each view is its own forward pass (BN statistics per view, as the official code). Heads
    follow the official MoCo v3: ViTs a 3-layer projector and a predictor ending in BN, CNNs a
    2-layer projector and a predictor without the last BN. The momentum encoder is updated in
    :meth:`update_target` after each step with m = 1 − (1 − ``momentum``)(1 + cos(π·progress))/2,
    the same value the official code applies before the next step's keys.

    Under DDP every rank's keys are all-gathered (no gradient) and are the negatives of every
    query; query ``i`` of rank ``r``'s positive is gathered key ``r·B + i``. BN is per rank
    unless ``model.sync_bn`` (the official code converts all BN to SyncBN).
    """

    name: ClassVar[str] = "mocov3"
    Config = MoCoV3Config

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: MoCoV3Config) -> None:
        super().__init__(backbone, feat_dim, cfg)
        vit = isinstance(backbone, ViT)
        if cfg.freeze_patch_embed and not vit:
            raise ValueError("mocov3 freeze_patch_embed needs a ViT backbone")
        if vit and cfg.sincos_pos_embed:
            with torch.no_grad():
                backbone.pos_embedding.copy_(sincos_pos_embed(backbone.grid, backbone.embed_dim))
            backbone.pos_embedding.requires_grad_(False)
        if cfg.freeze_patch_embed:
            backbone.conv_proj.requires_grad_(False)
        layers = cfg.proj_layers or (3 if vit else 2)
        # Official _build_mlp: bias-free Linears, BN-ReLU between, a non-affine last BN (the
        # ResNet predictor has none).
        self.projector = mlp(feat_dim, cfg.hidden_dim, cfg.proj_dim, layers, last_bn=True)
        self.predictor = mlp(cfg.proj_dim, cfg.hidden_dim, cfg.proj_dim, 2, last_bn=vit,
                             last_bias=False)
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)

    def transform(self, data_cfg: DataConfig) -> MultiViewTransform:
        """Two crops at ``data.image_size`` with area in ``crop_scale`` (MoCo v3: (0.08, 1))."""
        s = data_cfg.image_size
        return multi_crop_transform(s, s, num_global=2, num_local=0,
                                    global_scale=tuple(self.cfg.crop_scale),
                                    augment=self.cfg.augment)

    def forward(self, views: list[Tensor]) -> MethodOutput:
        """Symmetric contrastive loss of each view's query against the other view's keys."""
        self._check_views(views, 2)
        h = [self.backbone(v) for v in views]
        z = [self.projector(x) for x in h]
        q = [self.predictor(x) for x in z]
        with torch.no_grad():
            k = [self.key_projector(self.key_backbone(v)) for v in views]
            if self.training:  # evaluation may run on one rank alone: no collectives
                k = [gather_no_grad(x) for x in k]
        offset = rank() * views[0].shape[0] if self.training else 0
        t = self.cfg.temperature
        loss = (mocov3_contrastive_loss(q[0], k[1], t, offset)
                + mocov3_contrastive_loss(q[1], k[0], t, offset))
        return MethodOutput(loss=loss, embedding=h[0], projection=z[0])

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """The momentum encoder incl. its projector (official ``forward_feature``: encoder_k)."""
        return self.key_backbone, self.key_projector

    def momentum_at(self, progress: float) -> float:
        """The EMA momentum after ``progress`` of training (official ``adjust_moco_momentum``)."""
        m = self.cfg.momentum
        return cosine_momentum(m, progress) if self.cfg.momentum_cosine else m

    @torch.no_grad()
    def update_target(self, progress: float) -> None:
        """EMA of backbone and projector into the momentum encoder (not the predictor)."""
        m = self.momentum_at(progress)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)

