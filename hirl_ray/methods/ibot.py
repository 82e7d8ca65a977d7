"""iBOT (Zhou et al., ICLR 2022): DINO on the [CLS] token + masked patch self-distillation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hirl_ray.config import ConfigError, check_fraction, check_positive
from hirl_ray.losses.dino import dino_loss, update_center
from hirl_ray.losses.ibot import ibot_patch_loss
from hirl_ray.methods.base import MethodOutput, frozen_copy, register_method
from hirl_ray.methods.dino import DINO, NUM_GLOBAL, DINOConfig, epoch_warmup
from hirl_ray.methods.distributed import all_reduce_sum, world_size
from hirl_ray.models.dino_head import DINOHead, WeightNormLinear
from hirl_ray.models.masking import host_to_device, random_block_masks
from hirl_ray.models.multicrop import forward_by_resolution


@dataclass(frozen=True)
class IBOTConfig(DINOConfig):
    """``method:`` keys of iBOT: DINO's, plus the patch loss and its masks. Defaults: the
    official HIRL-iBOT ViT-B/16 config (hirl_ibot_vit_base_400eps)."""

    name: str = "ibot"
    out_dim: int = 8192                 # [CLS] prototypes
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    patch_out_dim: int = 8192           # patch prototypes (= out_dim with shared_head)
    shared_head: bool = True            # one head (and last layer) for [CLS] and patches
    patch_temp: float = 0.07            # teacher τ on patches after warm-up
    warmup_teacher_patch_temp: float = 0.04  # ... at epoch 0 (same warm-up epochs)
    patch_center_momentum: float = 0.9  # EMA of the patch centre (official center_momentum2)
    lambda1: float = 1.0                # weight of the [CLS] (DINO) loss
    lambda2: float = 1.0                # weight of the masked patch loss
    pred_ratio: tuple[float, ...] = (0.0, 0.3)      # per image one entry is drawn, then
    pred_ratio_var: tuple[float, ...] = (0.0, 0.2)  # ratio ~ U(entry ± var): 0 or U(0.1, 0.5)
    shape_keys: ClassVar[tuple[str, ...]] = ("proj_dim", "hidden_dim", "out_dim", "patch_out_dim",
                                             "shared_head")

    def check(self, where: str) -> None:
        super().check(where)
        check_positive(self, where, "patch_out_dim", "patch_temp", "warmup_teacher_patch_temp")
        check_positive(self, where, "lambda1", "lambda2", strict=False)
        check_fraction(f"{where}.patch_center_momentum", self.patch_center_momentum)
        if self.shared_head and self.patch_out_dim != self.out_dim:
            raise ConfigError(f"{where}.patch_out_dim ({self.patch_out_dim}) must equal "
                              f"{where}.out_dim ({self.out_dim}) with shared_head: true")
        if not self.pred_ratio or len(self.pred_ratio) != len(self.pred_ratio_var):
            raise ConfigError(f"{where}.pred_ratio and pred_ratio_var must be lists of one length, "
                              f"got {list(self.pred_ratio)} and {list(self.pred_ratio_var)}")
        for m, v in zip(self.pred_ratio, self.pred_ratio_var, strict=True):
            if not 0 <= m - v <= m + v <= 1:
                raise ConfigError(f"{where}.pred_ratio ± pred_ratio_var must stay in [0, 1], "
                                  f"got {m} ± {v}")


@register_method
class IBOT(DINO):
    """iBOT: DINO's [CLS] self-distillation plus masked image modelling with an online tokenizer.

    The student sees the global crops with block masks (:meth:`draw_masks`, iBOT's
    ``pred_shape: block``) and the local crops unmasked; the teacher sees the unmasked global
    crops. ``loss = λ1 · dino_loss([CLS]) + λ2 · ibot_patch_loss(masked patches)``; the patch
    loss pairs each crop with itself (masked student vs unmasked teacher) and has its own centre
    and teacher temperature (same warm-up epochs). With ``shared_head`` one :class:`DINOHead`
    projects [CLS] and patch tokens. Everything else (EMA teacher, schedules, last-layer
    freeze, parameter groups) is DINO's; both centres are all-reduced over the ranks.

    Masks are drawn on the host in training mode only (eval: no masks, patch loss 0). HIRL:
    ``vit_cls`` / ``projection`` is the student's [CLS] bottleneck of the (masked) first global
    crop (official ``inst_cls_emb``), ``vit_mean`` the mean of its patch bottlenecks
    (``inst_mean_emb``).
    """

    name: ClassVar[str] = "ibot"
    Config = IBOTConfig
    needs_vit: ClassVar[bool] = True
    embeddings: ClassVar[tuple[str, ...]] = ("projection", "backbone", "vit_cls", "vit_mean")

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: IBOTConfig) -> None:
        backbone.enable_masking()  # before DINO copies the teacher: equal parameter lists (EMA)
        super().__init__(backbone, feat_dim, cfg)
        if not cfg.shared_head:
            self.head.last_layer2 = WeightNormLinear(cfg.proj_dim, cfg.patch_out_dim,
                                                     trainable_g=not cfg.norm_last_layer)
            self.teacher_head = frozen_copy(self.head)
        self.register_buffer("patch_center", torch.zeros(1, cfg.patch_out_dim))
        self.patch_temp = self._patch_temperature(0)

    def _patch_temperature(self, epoch: int) -> float:
        c = self.cfg
        return epoch_warmup(c.patch_temp, c.warmup_teacher_patch_temp,
                            c.warmup_teacher_temp_epochs, epoch)

    def on_step_start(self, step: int, epoch: int, progress: float) -> None:
        """This epoch's [CLS] and patch teacher temperatures (official per-epoch linspace)."""
        super().on_step_start(step, epoch, progress)
        self.patch_temp = self._patch_temperature(epoch)

    def draw_masks(self, batch: int, grid: int) -> Tensor:
        """``(G, batch, grid²)`` block masks of the global crops (official ``ImageFolderMask``).

        Per crop and image one ``(pred_ratio, pred_ratio_var)`` entry is chosen uniformly and
        the ratio drawn from ``U(ratio − var, ratio + var)``: with the paper's ``[0, 0.3]`` /
        ``[0, 0.2]`` half of the crops are not masked, the others 10–50 %.
        """
        c = self.cfg
        picks = torch.randint(len(c.pred_ratio), (NUM_GLOBAL * batch,)).tolist()
        rows = [random_block_masks(1, grid, (c.pred_ratio[j] - c.pred_ratio_var[j],
                                             c.pred_ratio[j] + c.pred_ratio_var[j]))[0]
                for j in picks]
        return torch.stack(rows).view(NUM_GLOBAL, batch, grid * grid)

    def _logits(self, head: DINOHead, z: Tensor) -> tuple[Tensor, Tensor]:
        """[CLS] and patch logits of bottleneck tokens ``z`` ``(N, 1 + P, d)``."""
        z = F.normalize(z, dim=-1)
        patch_layer = getattr(head, "last_layer2", head.last_layer)
        return head.last_layer(z[:, 0]), patch_layer(z[:, 1:])

    def forward(self, views: list[Tensor]) -> MethodOutput:
        """λ1 · DINO loss on [CLS] + λ2 · masked patch loss on the global crops."""
        self._check_views(views, self.num_views)
        c, b = self.cfg, views[0].shape[0]
        grid = self.backbone.grid_size(views[0].shape[-1])
        if self.training:
            masks = host_to_device(self.draw_masks(b, grid), views[0].device)
        else:  # the all-False mask still ties [MASK] into the graph (DDP)
            masks = torch.zeros(NUM_GLOBAL, b, grid * grid, dtype=torch.bool,
                                device=views[0].device)
        glob = torch.cat(views[:NUM_GLOBAL])
        tokens = self.backbone.tokens(glob, masks.reshape(NUM_GLOBAL * b, -1))
        z = self.head.mlp(tokens)  # (G·B, 1 + N, d)
        cls, patch = self._logits(self.head, z)
        if len(views) > NUM_GLOBAL:
            cls = torch.cat([cls, self.head(forward_by_resolution(self.backbone,
                                                                  views[NUM_GLOBAL:]))])
        with torch.no_grad():
            t_cls, t_patch = self._logits(
                self.teacher_head, self.teacher_head.mlp(self.teacher_backbone.tokens(glob)))
        n = grid * grid
        loss = (c.lambda1 * dino_loss(cls.view(len(views), b, -1), t_cls.view(NUM_GLOBAL, b, -1),
                                      self.center, c.student_temp, self.teacher_temp)
                + c.lambda2 * ibot_patch_loss(patch.view(NUM_GLOBAL, b, n, -1),
                                              t_patch.view(NUM_GLOBAL, b, n, -1), masks,
                                              self.patch_center, c.student_temp, self.patch_temp))
        if self.training:  # evaluation may run on one rank alone: no collectives, no update
            self._update_centers(t_cls, t_patch)
        return MethodOutput(loss=loss, embedding=tokens[:b, 0], projection=z[:b, 0],
                            projection_mean=z[:b, 1:].mean(1))

    @torch.no_grad()
    def _update_centers(self, t_cls: Tensor, t_patch: Tensor) -> None:
        """Both centres from batch sums all-reduced in one call (official ``update_center``)."""
        k = t_cls.shape[1]
        sums = all_reduce_sum(torch.cat([t_cls.sum(0), t_patch.mean(1).sum(0)]).float())
        count = t_cls.shape[0] * world_size()
        self.center.copy_(update_center(self.center, sums[:k], count, self.cfg.center_momentum))
        self.patch_center.copy_(update_center(self.patch_center, sums[k:], count,
                                              self.cfg.patch_center_momentum))
