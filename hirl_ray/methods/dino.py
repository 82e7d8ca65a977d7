"""DINO (Caron et al., ICCV 2021): self-distillation of an EMA teacher, centring and sharpening."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from hirl_ray.config import ConfigError, check_choice, check_fraction, check_positive
from hirl_ray.data.transforms import AUGMENTS, MultiViewTransform, multi_crop_transform
from hirl_ray.losses.dino import dino_loss, update_center
from hirl_ray.methods.base import (
    MethodOutput,
    ProjectorConfig,
    SSLMethod,
    ema_update,
    frozen_copy,
    register_method,
    split_weight_decay,
)
from hirl_ray.methods.distributed import all_reduce_sum, world_size
from hirl_ray.models.dino_head import DINOHead
from hirl_ray.models.multicrop import forward_by_resolution
from hirl_ray.models.vit import vit_patch_size
from hirl_ray.schedules import cosine_momentum, teacher_temperature

if TYPE_CHECKING:
    from hirl_ray.config import DataConfig, ExperimentConfig

NUM_GLOBAL = 2  # DINO's two global crops (the teacher sees only these)


@dataclass(frozen=True)
class DINOConfig(ProjectorConfig):
    """``method:`` keys of DINO; defaults: the official HIRL-DINO ViT-B/16 config (400 epochs)."""

    name: str = "dino"
    proj_dim: int = 256                 # head bottleneck (official bottleneck_dim): HIRL's input
    hidden_dim: int = 2048              # head MLP hidden width
    out_dim: int = 65536                # prototypes K (last layer's outputs)
    norm_last_layer: bool = True        # last layer's weight-norm scale g fixed at 1
    student_temp: float = 0.1           # τ_s
    teacher_temp: float = 0.07          # τ_t after warm-up
    warmup_teacher_temp: float = 0.04   # τ_t at epoch 0
    warmup_teacher_temp_epochs: int = 50  # linear τ_t warm-up, per epoch (np.linspace)
    center_momentum: float = 0.9        # EMA of the centre c
    teacher_momentum: float = 0.996     # teacher EMA, cosine to 1
    freeze_last_layer_epochs: int = 3   # last layer's gradient dropped for these epochs
    num_local_crops: int = 10           # local crops besides the 2 global ones
    local_crop_size: int = 96           # local crop side in px (globals: data.image_size)
    global_crop_scale: tuple[float, float] = (0.25, 1.0)  # area range of global crops
    local_crop_scale: tuple[float, float] = (0.05, 0.25)  # area range of local crops
    augment: str = "byol"               # byol: DINO's asymmetric views (blur/solarise); simclr
    shape_keys: ClassVar[tuple[str, ...]] = ("proj_dim", "hidden_dim", "out_dim")

    def check(self, where: str) -> None:
        super().check(where)
        check_positive(self, where, "out_dim", "student_temp", "teacher_temp",
                       "warmup_teacher_temp", "local_crop_size")
        check_positive(self, where, "warmup_teacher_temp_epochs", "freeze_last_layer_epochs",
                       "num_local_crops", strict=False)
        check_fraction(f"{where}.center_momentum", self.center_momentum)
        check_fraction(f"{where}.teacher_momentum", self.teacher_momentum)
        check_choice(f"{where}.augment", self.augment, AUGMENTS)
        for key in ("global_crop_scale", "local_crop_scale"):
            scale = getattr(self, key)
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ConfigError(f"{where}.{key} must be [min, max] with 0 < min <= max <= 1, "
                                  f"got {list(scale)}")

    def check_experiment(self, cfg: ExperimentConfig) -> None:
        """Local crops must fit the global crop and the ViT's patches.

        A τ_t warm-up longer than ``train.epochs`` is allowed (τ_t then never reaches
        ``teacher_temp``), so short runs of the paper's settings need no edit.
        """
        check_crop_sizes(cfg, self.local_crop_size if self.num_local_crops else None)


def check_crop_sizes(cfg: ExperimentConfig, local_size: int | None) -> None:
    """``method.local_crop_size`` below ``data.image_size`` and, for ViTs, a patch multiple."""
    if local_size is None:
        return
    if local_size > cfg.data.image_size:
        raise ConfigError(f"method.local_crop_size ({local_size}) must be <= data.image_size "
                          f"({cfg.data.image_size}), the global crop side")
    if cfg.model.is_vit:
        patch = vit_patch_size(cfg.model, cfg.data.image_size)
        if local_size % patch:
            fit = max(patch, local_size // patch * patch)
            raise ConfigError(f"method.local_crop_size ({local_size}) must be a multiple of the "
                              f"ViT patch ({patch} px); e.g. {fit}")


def epoch_warmup(base: float, start: float, warmup_epochs: int, epoch: int) -> float:
    """``linspace(start, base, warmup_epochs)[epoch]``, then ``base``: the official per-epoch
    teacher-temperature schedule (``epoch`` 0-based).

    Indexed by the epoch, not by progress, so it needs no ``train.epochs``: the fraction of the
    warm-up done is ``epoch / (warmup_epochs − 1)`` (one warm-up epoch: ``start`` for epoch 0).
    """
    return teacher_temperature(base, epoch / max(warmup_epochs - 1, 1), start,
                               warmup_progress=1.0 if warmup_epochs > 0 else 0.0)


def dino_teacher_temperature(cfg: DINOConfig, epoch: int) -> float:
    """τ_t of ``epoch``: ``warmup_teacher_temp`` → ``teacher_temp`` (:func:`epoch_warmup`)."""
    return epoch_warmup(cfg.teacher_temp, cfg.warmup_teacher_temp,
                        cfg.warmup_teacher_temp_epochs, epoch)


@register_method
class DINO(SSLMethod):
    """DINO: a student (backbone + :class:`DINOHead`) matches an EMA teacher over crops.

    Views: 2 global crops at ``data.image_size`` then ``num_local_crops`` local crops
    (multi-crop, one backbone pass per resolution). The teacher sees the global crops; the
    loss (:func:`~hirl_ray.losses.dino.dino_loss`) pairs every teacher crop with every other
    student view. The teacher's logits are centred with ``center`` (EMA of their batch mean)
    and sharpened with τ_t, warmed up per epoch in :meth:`on_step_start`. The teacher follows
    the student with cosine momentum 0.996 → 1 (:meth:`update_target`); the last layer's
    gradient is dropped for the first ``freeze_last_layer_epochs`` (:meth:`after_backward`).

    Distributed: the teacher logits' batch sum is all-reduced before the centre update, so the
    centre is the mean over the global batch and identical on every rank (no other collective;
    the loss of each rank's local batch is averaged by DDP).

    Evaluation (kNN, linear, ``load_backbone``) uses the teacher backbone, as DINO and the
    official HIRL code (``self.backbone = self.teacher``) do. HIRL: the student's bottleneck
    (``head.mlp`` output, ``proj_dim`` wide) of the first global crop is its input (official
    ``inst_cls_emb``); the teacher backbone + ``head.mlp`` is clustered (official
    ``forward_feature``).
    """

    name: ClassVar[str] = "dino"
    Config = DINOConfig
    eval_backbone: ClassVar[str] = "teacher_backbone"

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: DINOConfig) -> None:
        super().__init__(backbone, feat_dim, cfg)
        self.head = DINOHead(feat_dim, cfg.out_dim, cfg.hidden_dim, cfg.proj_dim,
                             norm_last_layer=cfg.norm_last_layer)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head)
        if hasattr(self.teacher_backbone, "drop_path"):  # the teacher has no stochastic depth
            self.teacher_backbone.drop_path = [0.0] * len(self.teacher_backbone.drop_path)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.teacher_temp = dino_teacher_temperature(cfg, 0)

    @property
    def num_views(self) -> int:
        """Views per image: the global crops, then the local ones."""
        return NUM_GLOBAL + self.cfg.num_local_crops

    def transform(self, data_cfg: DataConfig) -> MultiViewTransform:
        """2 global crops at ``data.image_size``, then ``num_local_crops`` local crops."""
        c = self.cfg
        return multi_crop_transform(data_cfg.image_size, c.local_crop_size, NUM_GLOBAL,
                                    c.num_local_crops, c.global_crop_scale, c.local_crop_scale,
                                    augment=c.augment)

    def param_groups(self) -> list[dict[str, Any]]:
        """No weight decay on norms and biases (DINO's ``get_params_groups``)."""
        return split_weight_decay(self.named_parameters())

    def on_step_start(self, step: int, epoch: int, progress: float) -> None:
        """This epoch's teacher temperature (:func:`dino_teacher_temperature`)."""
        self.teacher_temp = dino_teacher_temperature(self.cfg, epoch)

    def after_backward(self, step: int, epoch: int) -> None:
        """Drop the last layer's gradient during the first ``freeze_last_layer_epochs``."""
        if epoch < self.cfg.freeze_last_layer_epochs:
            for name, p in self.head.named_parameters():
                if name.startswith("last_layer"):  # iBOT's patch layer too (official)
                    p.grad = None

    @torch.no_grad()
    def teacher_logits(self, global_views: list[Tensor]) -> Tensor:
        """Teacher logits of the global crops, ``(G·B, out_dim)``."""
        return self.teacher_head(forward_by_resolution(self.teacher_backbone, global_views))

    @torch.no_grad()
    def _update_center(self, teacher: Tensor) -> None:
        total = all_reduce_sum(teacher.sum(0, keepdim=True).float())
        self.center.copy_(update_center(self.center, total, teacher.shape[0] * world_size(),
                                        self.cfg.center_momentum))

    def forward(self, views: list[Tensor]) -> MethodOutput:
        """DINO loss of the student's views against the teacher's global crops."""
        self._check_views(views, self.num_views)
        b = views[0].shape[0]
        h = forward_by_resolution(self.backbone, views)
        z = self.head.mlp(h)
        student = self.head.prototypes(z)
        teacher = self.teacher_logits(views[:NUM_GLOBAL])
        loss = dino_loss(student.view(len(views), b, -1), teacher.view(NUM_GLOBAL, b, -1),
                         self.center, self.cfg.student_temp, self.teacher_temp)
        if self.training:  # evaluation may run on one rank alone: no collectives, no update
            self._update_center(teacher)
        return MethodOutput(loss=loss, embedding=h[:b], projection=z[:b])

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """Teacher backbone + teacher ``head.mlp`` (official ``forward_feature``)."""
        return self.teacher_backbone, self.teacher_head.mlp

    @torch.no_grad()
    def update_target(self, progress: float) -> None:
        """Teacher ← EMA of the student, momentum cosine from ``teacher_momentum`` to 1."""
        m = cosine_momentum(self.cfg.teacher_momentum, progress)
        ema_update(self.teacher_backbone, self.backbone, m)
        ema_update(self.teacher_head, self.head, m)
