"""MoCo v2 (Chen et al., 2020; He et al., CVPR 2020): momentum key encoder + queue of keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hirl_ray.config import check_fraction, check_positive
from hirl_ray.losses.info_nce import info_nce_loss
from hirl_ray.methods.base import (
    MethodOutput,
    ProjectorConfig,
    SSLMethod,
    ema_update,
    frozen_copy,
    register_method,
)
from hirl_ray.methods.distributed import (
    gather_no_grad,
    has_sync_bn,
    rank,
    shuffle_across_ranks,
    unshuffle_across_ranks,
    world_size,
)
from hirl_ray.models.heads import mlp
from hirl_ray.models.multicrop import forward_by_resolution


@dataclass(frozen=True)
class MoCoV2Config(ProjectorConfig):
    """``method:`` keys of MoCo v2: InfoNCE τ, the key encoder's constant momentum, queue size."""

    name: str = "mocov2"
    temperature: float = 0.2
    momentum: float = 0.99
    queue_size: int = 4096
    shape_keys = ("proj_dim", "hidden_dim", "queue_size")

    def check(self, where: str) -> None:
        super().check(where)
        check_positive(self, where, "temperature", "queue_size")
        check_fraction(f"{where}.momentum", self.momentum)


@register_method
class MoCoV2(SSLMethod):
    """MoCo v2: query encoder (backbone + MLP projector), EMA key encoder, queue, τ = 0.2.

    The loss is symmetrised (each view is once the query, once the key; as in MoCo v3) and
    both views' keys are enqueued. The key encoder is updated with constant momentum
    ``cfg.momentum`` in :meth:`update_target`, after the optimiser step, which is the same
    order as MoCo's "update keys, then encode" at the start of the next step.

    Under DDP the keys of every rank are all-gathered (no gradient; MoCo's
    ``concat_all_gather``) and all ``2·B_global`` of them are enqueued on every rank, so the
    queue spans ``queue_size / (2·B_global)`` steps, as in MoCo, and is identical on all ranks
    (DDP must not broadcast buffers, see :func:`~hirl_ray.methods.distributed.ddp_kwargs`).
    The key encoder's BN must not see a query's batch-mates alone, or BN leaks which key is
    the positive (He et al. 2020, Sec. 3.3): with ``model.sync_bn`` its BN is global; without
    it the key batch is shuffled across ranks (MoCo's shuffle-BN). With one rank neither
    applies and BN is over the local batch.
    """

    name: ClassVar[str] = "mocov2"
    Config = MoCoV2Config

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: MoCoV2Config) -> None:
        super().__init__(backbone, feat_dim, cfg)
        self.projector = mlp(feat_dim, cfg.hidden_dim, cfg.proj_dim)
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        # Random unit vectors until real keys arrive (as in the official code).
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        return F.normalize(self.key_projector(self.key_backbone(x)), dim=1)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` into the ring buffer at ``queue_ptr``, wrapping around the end."""
        size = self.queue.shape[0]
        keys = keys[-size:]  # more keys than slots: only the newest fit
        n = keys.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.add_(n).remainder_(size)  # in place, no host sync

    @torch.no_grad()
    def _keys_of_all_ranks(self, x: Tensor) -> Tensor:
        """Keys of all ranks' ``x`` in rank order, ``(W·2B, D)``; shuffle-BN unless BN is synced."""
        if world_size() > 1 and not has_sync_bn(self.key_backbone):
            shuffled, inverse = shuffle_across_ranks(x)
            return unshuffle_across_ranks(self._keys(shuffled), inverse)
        return gather_no_grad(self._keys(x))

    def forward(self, views: list[Tensor]) -> MethodOutput:
        """Symmetric InfoNCE against the queue, then enqueue the keys of all ranks."""
        self._check_views(views, 2)
        b = views[0].shape[0]
        h = forward_by_resolution(self.backbone, views)
        z = self.projector(h)
        q = F.normalize(z, dim=1)
        # The key batch is one tensor (shuffle-BN permutes it across ranks): MoCo's two views
        # have one size.
        if self.training:
            all_k = self._keys_of_all_ranks(torch.cat(views))
            k = all_k[rank() * 2 * b:(rank() + 1) * 2 * b]
        else:  # evaluation may run on one rank alone: no collectives
            k = all_k = self._keys(torch.cat(views))
        queue = self.queue.clone().detach()  # the enqueue below must not alter the graph
        t = self.cfg.temperature
        loss = 0.5 * (info_nce_loss(q[:b], k[b:], queue, t) + info_nce_loss(q[b:], k[:b], queue, t))
        if self.training:
            # View-major order (all view-1 keys, then all view-2), as one worker with the
            # global batch would enqueue them.
            w = all_k.shape[0] // (2 * b)
            self._enqueue(all_k.view(w, 2, b, -1).transpose(0, 1).reshape(all_k.shape))
        return MethodOutput(loss=loss, embedding=h[:b], projection=z[:b])

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """The key (momentum) encoder, as official HIRL-MoCo's ``forward_feature``."""
        return self.key_backbone, self.key_projector

    @torch.no_grad()
    def update_target(self, progress: float) -> None:
        """Momentum update of the key encoder (MoCo Eq. 2), constant ``cfg.momentum``."""
        m = self.cfg.momentum
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)
