"""SwAV (Caron et al., NeurIPS 2020): online clustering with swapped prediction, multi-crop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hirl_ray.config import ConfigError, check_positive
from hirl_ray.data.transforms import MultiCrop, multi_crop_transform
from hirl_ray.losses.swav import sinkhorn, swav_loss
from hirl_ray.methods.base import MethodOutput, ProjectorConfig, SSLMethod, register_method
from hirl_ray.methods.distributed import all_reduce_sum, gather_no_grad, rank, world_size
from hirl_ray.models.heads import mlp
from hirl_ray.models.multicrop import forward_by_resolution
from hirl_ray.models.vit import vit_patch_size

if TYPE_CHECKING:
    from hirl_ray.config import DataConfig, ExperimentConfig


@dataclass(frozen=True)
class SwAVConfig(ProjectorConfig):
    """``method:`` keys of SwAV (defaults: the paper's / official HIRL-SwAV 200-epoch config)."""

    name: str = "swav"
    hidden_dim: int = 2048  # projector hidden width (official hidden_mlp)
    num_prototypes: int = 3000  # K prototypes (official num_proto)
    temperature: float = 0.1  # τ of the swapped prediction's softmax (official T)
    epsilon: float = 0.05  # Sinkhorn entropy weight ε
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations
    num_local_crops: int = 6  # local crops beside the 2 global ones (official nmb_crops [2, 6])
    crop_sizes: tuple[int, ...] = (224, 96)  # [global, local] crop side (official size_crops)
    min_scale_crops: tuple[float, ...] = (0.14, 0.05)  # [global, local] min crop area
    max_scale_crops: tuple[float, ...] = (1.0, 0.14)  # [global, local] max crop area
    queue_length: int = 0  # stored embeddings per global crop (0 = no queue, as the paper)
    queue_start_epochs: int = 15  # epoch from which the queue fills (official SwAV default)
    freeze_prototypes_steps: int = 313  # prototypes get no update for these first steps
    shape_keys = ("proj_dim", "hidden_dim", "num_prototypes", "queue_length")

    def check(self, where: str) -> None:
        super().check(where)
        check_positive(self, where, "num_prototypes", "temperature", "epsilon", "sinkhorn_iters")
        check_positive(self, where, "num_local_crops", "queue_length", "queue_start_epochs",
                       "freeze_prototypes_steps", strict=False)
        for key in ("crop_sizes", "min_scale_crops", "max_scale_crops"):
            if len(getattr(self, key)) != 2:
                raise ConfigError(f"{where}.{key} must be [global, local], got "
                                  f"{list(getattr(self, key))}")
        if min(self.crop_sizes) < 1:
            raise ConfigError(f"{where}.crop_sizes must be positive, got {list(self.crop_sizes)}")
        for i, part in enumerate(("global", "local")):
            lo, hi = self.min_scale_crops[i], self.max_scale_crops[i]
            if not 0 < lo <= hi <= 1:
                raise ConfigError(f"{where}: the {part} crop scale needs 0 < min_scale_crops[{i}]"
                                  f" ({lo}) <= max_scale_crops[{i}] ({hi}) <= 1")

    def check_experiment(self, cfg: ExperimentConfig) -> None:
        """Global crops at ``data.image_size`` (what clustering/eval see); queue fits batches."""
        if self.crop_sizes[0] != cfg.data.image_size:
            raise ConfigError(f"method.crop_sizes[0] ({self.crop_sizes[0]}) must equal "
                              f"data.image_size ({cfg.data.image_size}), the size clustering "
                              f"and evaluation see; e.g. method.crop_sizes=[{cfg.data.image_size}"
                              f", {max(1, cfg.data.image_size * 3 // 7)}]")
        if self.queue_length % cfg.train.batch_size:
            raise ConfigError(f"method.queue_length ({self.queue_length}) must be a multiple of "
                              f"train.batch_size ({cfg.train.batch_size}, global), or 0")
        if cfg.model.is_vit:
            patch = vit_patch_size(cfg.model, cfg.data.image_size)
            if self.num_local_crops and self.crop_sizes[1] % patch:
                raise ConfigError(f"method.crop_sizes[1] ({self.crop_sizes[1]}) must be a "
                                  f"multiple of the ViT patch ({patch} px)")


@register_method
class SwAV(SSLMethod):
    """SwAV: backbone → MLP projector → L2 norm → prototypes; codes by Sinkhorn, swapped.

    Codes come from the two global crops only and are predicted from every other crop
    (multi-crop, Sec. 3.2). The prototype weights are L2-normalised before every training
    forward and get no update for the first ``freeze_prototypes_steps`` steps
    (:meth:`after_backward`), as the official code does.

    Distributed: the Sinkhorn sums run over the GLOBAL batch (``all_reduce_sum``), so W ranks
    with B rows each give the codes of one process with the W·B rows. The optional queue
    (``queue_length > 0``, filling from epoch ``queue_start_epochs``, used once full, as
    SwAV's ``use_the_queue``) holds the all-gathered embeddings of both global crops and is
    the same on every rank (unlike the official per-rank queues, so checkpoints do not depend
    on the worker count); rank r feeds its 1/W slice of it to the Sinkhorn, so every stored
    row counts once globally.
    """

    name: ClassVar[str] = "swav"
    Config = SwAVConfig

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: SwAVConfig) -> None:
        super().__init__(backbone, feat_dim, cfg)
        self.projector = mlp(feat_dim, cfg.hidden_dim, cfg.proj_dim)
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.num_prototypes, bias=False)
        if cfg.queue_length:
            # Newest first, per global crop; zeros = empty (SwAV's and HIRL's convention).
            self.register_buffer("queue", torch.zeros(2, cfg.queue_length, cfg.proj_dim))
        self._epoch = 0

    def transform(self, data_cfg: DataConfig) -> MultiCrop:
        """2 global + ``num_local_crops`` local crops with the configured sizes and scales.

        Colour jitter at SwAV's strength (0.8, 0.8, 0.8, 0.2; official HIRL
        ``MultiCropsTransform`` with ``color_scale`` 1), twice the MoCo v2 default here.
        """
        c = self.cfg
        return multi_crop_transform(c.crop_sizes[0], c.crop_sizes[1], 2, c.num_local_crops,
                                    (c.min_scale_crops[0], c.max_scale_crops[0]),
                                    (c.min_scale_crops[1], c.max_scale_crops[1]), strength=2.0)

    def on_step_start(self, step: int, epoch: int, progress: float) -> None:
        """Remember the epoch: the queue fills from ``queue_start_epochs`` on."""
        self._epoch = epoch

    def after_backward(self, step: int, epoch: int) -> None:
        """No prototype update during the first ``freeze_prototypes_steps`` steps (SwAV's
        ``freeze_prototypes_niters``; official HIRL ``freeze_proto_iter``): grad ``None`` makes
        the optimiser skip them (no weight decay, no momentum) as the official code does."""
        if step < self.cfg.freeze_prototypes_steps:
            self.prototypes.weight.grad = None

    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    @torch.no_grad()
    def _codes(self, scores: Tensor, crop: int, distributed: bool, use_queue: bool) -> Tensor:
        """Sinkhorn codes of this rank's ``scores`` of global crop ``crop`` (queue prepended)."""
        n = scores.shape[0]
        if use_queue:
            w, r = (world_size(), rank()) if distributed else (1, 0)
            part = self.queue[crop].view(w, -1, self.queue.shape[-1])[r]  # this rank's slice
            scores = torch.cat([self.prototypes(part).to(scores.dtype), scores])
        reduce = all_reduce_sum if distributed else (lambda x: x)
        return sinkhorn(scores, self.cfg.epsilon, self.cfg.sinkhorn_iters, reduce)[-n:]

    @torch.no_grad()
    def _enqueue(self, z: Tensor, b: int) -> None:
        """Shift in the global batch's embeddings of both global crops (rank order)."""
        for crop in range(2):
            new = gather_no_grad(z[crop * b:(crop + 1) * b].contiguous())
            n = min(new.shape[0], self.queue.shape[1])
            self.queue[crop] = torch.cat([new[:n].to(self.queue.dtype), self.queue[crop, :-n]])

    def forward(self, views: list[Tensor]) -> MethodOutput:
        """Swapped prediction of the global crops' codes from every other crop."""
        self._check_views(views, 2 + self.cfg.num_local_crops)
        if self.training:
            self._normalize_prototypes()
        b = views[0].shape[0]
        h = forward_by_resolution(self.backbone, views)
        z = self.projector(h)  # one pass: BN over every crop, as the official SwAV head
        zn = F.normalize(z, dim=1)
        scores = self.prototypes(zn)
        crops = list(scores.split(b))
        # Collectives only in training: evaluation may run on one rank alone.
        distributed = self.training and world_size() > 1
        queue = self.training and hasattr(self, "queue")
        # Used once full (SwAV's check: the oldest slot is filled; one host read per step).
        use_queue = queue and bool(self.queue[:, -1].any())
        codes = [self._codes(crops[i].detach(), i, distributed, use_queue) for i in range(2)]
        if queue and self._epoch >= self.cfg.queue_start_epochs:
            self._enqueue(zn.detach(), b)
        loss = swav_loss(crops, codes, self.cfg.temperature)
        return MethodOutput(loss=loss, embedding=h[:b], projection=z[:b])

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """The online backbone + projector: official HIRL-SwAV's ``forward_feature`` is
        ``self.encoder(images)``, the ResNet whose ``fc`` is the projection MLP."""
        return self.backbone, self.projector
