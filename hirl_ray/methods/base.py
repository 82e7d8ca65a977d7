"""The protocol every SSL method implements, plus the EMA helpers two of them share."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hirl_ray.config import METHODS, MethodConfig, check_positive

#: ``hirl.embedding`` choices (HIRL's ``train_emb``; ``vit_cls``/``vit_mean`` once ViTs exist).
EMBEDDINGS = ("projection", "backbone")


@dataclass
class MethodOutput:
    """What a method's forward returns.

    Attributes:
        loss: Scalar SSL loss.
        embedding: ``(B, feat_dim)`` online *backbone* features of ``views[0]``, with grad;
            HIRL's heads sit here with ``hirl.embedding=backbone``.
        projection: ``(B, proj_dim)`` online *projector* output of ``views[0]`` (before any
            normalisation), with grad: the official HIRL ``inst_emb``, where its heads sit
            (``hirl.embedding=projection``, HIRL Sec. 3.2).
    """

    loss: Tensor
    embedding: Tensor
    projection: Tensor


@dataclass(frozen=True)
class ProjectorConfig(MethodConfig):
    """Keys every method here shares: the projector MLP's output and hidden width."""

    proj_dim: int = 128
    hidden_dim: int = 512
    shape_keys: ClassVar[tuple[str, ...]] = ("proj_dim", "hidden_dim")

    def check(self, where: str) -> None:
        check_positive(self, where, "proj_dim", "hidden_dim")


def register_method(cls: type[SSLMethod]) -> type[SSLMethod]:
    """Class decorator: make ``method.name: <cls.name>`` build ``cls`` with ``cls.Config``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a name to be registered")
    METHODS.register(cls.name, cls)
    return cls


class SSLMethod(nn.Module):
    """Base class: a backbone plus method-specific heads and loss.

    Subclasses set ``name``, build their heads in ``__init__`` and implement ``forward``.
    Target/key networks (BYOL, MoCo) are attributes with ``requires_grad=False``: the
    optimiser and DDP ignore them, yet they sit in ``state_dict`` so checkpoints restore them.

    Args:
        backbone: Maps ``(B, 3, H, W)`` to ``(B, feat_dim)``.
        feat_dim: Backbone output size.
        cfg: The ``method:`` config section.
    """

    name: ClassVar[str] = ""
    #: The ``method:`` section's dataclass (registered with the class, see ``register_method``).
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    num_views: ClassVar[int] = 2

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.cfg = cfg

    def _check_views(self, views: list[Tensor]) -> None:
        if len(views) != self.num_views:
            raise ValueError(
                f"{self.name} expects {self.num_views} views per image, "
                f"got {len(views)}; set the data pipeline to produce {self.num_views}"
            )

    def forward(self, views: list[Tensor]) -> MethodOutput:  # pragma: no cover - abstract
        """Compute the SSL loss on ``views`` (each ``(B, 3, H, W)``)."""
        raise NotImplementedError

    @torch.no_grad()
    def update_target(self, progress: float) -> None:
        """Called after every optimiser step; ``progress`` ∈ [0, 1] of training. No-op here."""

    def embed(self, x: Tensor) -> Tensor:
        """Frozen-evaluation features ``self.backbone(x)``, ``(B, feat_dim)``.

        Used for kNN and linear evaluation; the caller chooses ``eval()`` mode and
        ``torch.no_grad()`` (BN must be in eval mode for evaluation, lightly #1444).
        """
        return self.backbone(x)

    def embedding_dim(self, embedding: str) -> int:
        """Width of ``hirl.embedding``: the HIRL heads' input and the clustered features."""
        _check_embedding(embedding)
        return self.feat_dim if embedding == "backbone" else self.cfg.proj_dim

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """The ``(backbone, projector)`` whose output is clustered (official ``forward_feature``).

        The target/momentum network where the method has one, else the online network.
        """
        raise NotImplementedError  # pragma: no cover - every method says which

    def cluster_embed(self, x: Tensor, embedding: str = "projection") -> Tensor:
        """L2-normalised float32 clustering input ``(B, embedding_dim(embedding))``.

        The projector output (``projection``) or the backbone output (``backbone``) of
        :meth:`clustering_encoder`. As for :meth:`embed`, the caller picks ``eval()`` and
        ``no_grad`` (official HIRL extracts in eval mode, on un-augmented images).
        """
        _check_embedding(embedding)
        backbone, projector = self.clustering_encoder()
        h = backbone(x)
        return F.normalize((h if embedding == "backbone" else projector(h)).float(), dim=1)


def _check_embedding(embedding: str) -> None:
    if embedding not in EMBEDDINGS:
        raise ValueError(
            f"hirl.embedding must be one of {', '.join(EMBEDDINGS)}, got {embedding!r}"
        )


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` on every parameter (a target/key network)."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's target decay τ = 1 − (1 − τ_base)·(cos(π·progress) + 1)/2 (Grill et al., Sec. 3.2)."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``θ_target ← m·θ_target + (1 − m)·θ_online`` over parameters (MoCo Eq. 2, BYOL Sec. 3.1).

    Buffers (BN running statistics) are left alone, as in the official MoCo code: the target
    runs in train mode, so its BN uses batch statistics and its running stats are unused.
    """
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)
