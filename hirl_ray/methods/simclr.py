"""SimCLR (Chen et al., ICML 2020): NT-Xent over two augmented views."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from hirl_ray.config import check_positive
from hirl_ray.losses.nt_xent import nt_xent_loss
from hirl_ray.methods.base import MethodOutput, ProjectorConfig, SSLMethod, register_method
from hirl_ray.methods.distributed import gather, rank
from hirl_ray.models.heads import mlp
from hirl_ray.models.multicrop import forward_by_resolution


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
        self._check_views(views, 2)
        b = views[0].shape[0]
        # One backbone pass over both views: BN sees the joint batch, as in SimCLR.
        h = forward_by_resolution(self.backbone, views)
        z = self.projector(h)
        z1, z2 = z[:b], z[b:]
        loss = nt_xent_loss(z1, z2, self.cfg.temperature, gather(z1), gather(z2),
                            offset=rank() * b)
        return MethodOutput(loss=loss, embedding=h[:b], projection=z1)

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """No target network: the online backbone and projector are clustered."""
        return self.backbone, self.projector
