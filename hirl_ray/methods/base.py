"""The protocol every SSL method implements, plus the EMA and parameter-group helpers.

A method is a module with a loss (``forward``) that also supplies what the training loop
needs from it (protocol v2): its input views (:meth:`SSLMethod.transform`), its optimiser
parameter groups (:meth:`SSLMethod.param_groups`), a hook before each step's forward that
reads the schedules (:meth:`SSLMethod.on_step_start`), a hook between backward and the
optimiser step (:meth:`SSLMethod.after_backward`) and the target-network update
(:meth:`SSLMethod.update_target`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hirl_ray.config import HIRL_EMBEDDINGS, METHODS, MethodConfig, check_positive
from hirl_ray.data.transforms import MultiViewTransform, multi_view_transform
from hirl_ray.models.backbones import build_backbone

if TYPE_CHECKING:
    from hirl_ray.config import DataConfig, ExperimentConfig

#: ``hirl.embedding`` choices (HIRL's ``train_emb``: ``projection`` is its ``cnn``).
EMBEDDINGS = HIRL_EMBEDDINGS


@dataclass
class MethodOutput:
    """What a method's forward returns.

    Attributes:
        loss: Scalar SSL loss.
        embedding: ``(B, feat_dim)`` online *backbone* features of ``views[0]``, with grad;
            HIRL's heads sit here with ``hirl.embedding=backbone``.
        projection: ``(B, proj_dim)`` online *projector* output of ``views[0]`` (before any
            normalisation), with grad: the official HIRL ``inst_emb`` (ViTs: of the ``[CLS]``
            token, ``inst_cls_emb``), where its heads sit (``hirl.embedding=projection`` or
            ``vit_cls``, HIRL Sec. 3.2).
        projection_mean: ``(B, proj_dim)`` mean over the patch tokens of ``views[0]`` of their
            projections (official ``inst_mean_emb``, ``hirl.embedding=vit_mean``); only methods
            that project patch tokens (``"vit_mean" in embeddings``) fill it.
    """

    loss: Tensor
    embedding: Tensor
    projection: Tensor
    projection_mean: Tensor | None = None


@dataclass(frozen=True)
class ProjectorConfig(MethodConfig):
    """Keys every method here shares: the projector MLP's output and hidden width."""

    proj_dim: int = 128
    hidden_dim: int = 512
    shape_keys: ClassVar[tuple[str, ...]] = ("proj_dim", "hidden_dim")

    def check(self, where: str) -> None:
        check_positive(self, where, "proj_dim", "hidden_dim")


def build_method(cfg: ExperimentConfig) -> SSLMethod:
    """The backbone of ``cfg.model`` at ``cfg.data.image_size`` wrapped in ``cfg.method``."""
    cls = METHODS.get(cfg.method.name)
    backbone, feat_dim = build_backbone(cfg.model, cfg.data.image_size)
    return cls(backbone, feat_dim, cfg.method)


def register_method(cls: type[SSLMethod]) -> type[SSLMethod]:
    """Class decorator: make ``method.name: <cls.name>`` build ``cls`` with ``cls.Config``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} needs a name to be registered")
    METHODS.register(cls.name, cls)
    return cls


class SSLMethod(nn.Module):
    """Base class: a backbone plus method-specific heads and loss.

    Subclasses set ``name`` and ``Config``, build their heads in ``__init__`` and implement
    ``forward`` and ``clustering_encoder``; they override :meth:`transform`,
    :meth:`param_groups`, :meth:`after_backward` or :meth:`update_target` where they differ
    from the defaults. Target/key networks (BYOL, MoCo) are attributes with
    ``requires_grad=False``: the optimiser and DDP ignore them, yet they sit in ``state_dict``
    so checkpoints restore them.

    Args:
        backbone: Maps ``(B, 3, H, W)`` to ``(B, feat_dim)``.
        feat_dim: Backbone output size.
        cfg: The ``method:`` config section (an instance of ``Config``).
    """

    name: ClassVar[str] = ""
    #: The ``method:`` section's dataclass (registered with the class, see ``register_method``).
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: The ``hirl.embedding`` values this method produces (``vit_*`` also need a ViT backbone).
    embeddings: ClassVar[tuple[str, ...]] = ("projection", "backbone", "vit_cls")
    #: True when the method reads patch tokens (masking): the loader refuses CNN backbones.
    needs_vit: ClassVar[bool] = False
    #: The attribute holding the network evaluated (kNN, linear, ``load_backbone``): the online
    #: ``backbone``, or e.g. DINO's ``teacher_backbone`` (the official code evaluates the teacher).
    eval_backbone: ClassVar[str] = "backbone"

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.cfg = cfg

    def transform(self, data_cfg: DataConfig) -> MultiViewTransform:
        """The training views of one image: a list of per-view pipelines.

        Default: two SimCLR/MoCo v2 views at ``data.image_size``
        (:func:`~hirl_ray.data.transforms.multi_view_transform`). Multi-crop methods return
        more pipelines, at other resolutions; :func:`~hirl_ray.models.forward_by_resolution`
        runs the backbone once per resolution group.
        """
        return multi_view_transform(data_cfg.image_size)

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups over the trainable (``requires_grad``) parameters.

        Default: one group of all of them (every group gets ``train.weight_decay``). A group
        may carry the keys :func:`~hirl_ray.train.optim.build_optimizer` and the loop read:
        ``weight_decay`` (its own, e.g. 0 for norms and biases, see
        :func:`split_weight_decay`), ``lr_scale`` (multiplies the scheduled lr),
        ``fixed_lr: True`` (the lr stays at ``train.lr``: SimSiam's predictor) and
        ``lars_exclude: True`` (LARS skips adaptation and weight decay).
        """
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def on_step_start(self, step: int, epoch: int, progress: float) -> None:
        """Hook before each training step's forward: read this step's schedules.

        ``step`` is the global step, ``epoch`` 0-based, ``progress`` ∈ [0, 1) the fraction of
        training done before this step (DINO's teacher temperature, masking start). No-op here.
        """

    def after_backward(self, step: int, epoch: int) -> None:
        """Hook after backward, before the optimiser step (real, unscaled gradients under AMP).

        For gradient clipping or freezing a layer's gradient for the first epochs (DINO's
        ``cancel_gradients_last_layer``). ``step`` is the global step, ``epoch`` 0-based.
        No-op here.
        """

    def _check_views(self, views: list[Tensor], expected: int) -> None:
        if len(views) != expected:
            raise ValueError(
                f"{self.name} expects {expected} views per image, got {len(views)}; "
                f"its transform(data_cfg) must return {expected} view pipelines"
            )

    def forward(self, views: list[Tensor]) -> MethodOutput:  # pragma: no cover - abstract
        """Compute the SSL loss on ``views`` (each ``(B, 3, H, W)``)."""
        raise NotImplementedError

    @torch.no_grad()
    def update_target(self, progress: float) -> None:
        """Called after every optimiser step; ``progress`` ∈ [0, 1] of training. No-op here."""

    def embed(self, x: Tensor) -> Tensor:
        """Frozen-evaluation features of the :attr:`eval_backbone` network, ``(B, feat_dim)``.

        Used for kNN and linear evaluation; the caller chooses ``eval()`` mode and
        ``torch.no_grad()`` (BN must be in eval mode for evaluation, lightly #1444).
        """
        return getattr(self, self.eval_backbone)(x)

    def embedding_dim(self, embedding: str) -> int:
        """Width of ``hirl.embedding``: the HIRL heads' input and the clustered features."""
        _check_embedding(embedding)
        return self.feat_dim if embedding == "backbone" else self.cfg.proj_dim

    def hirl_input(self, out: MethodOutput, embedding: str) -> Tensor:
        """The tensor of ``out`` HIRL's heads read for ``hirl.embedding`` (with grad)."""
        _check_embedding(embedding)
        if embedding == "backbone":
            return out.embedding
        if embedding == "vit_mean":
            if out.projection_mean is None:
                raise ValueError(f"hirl.embedding=vit_mean: method {self.name} does not "
                                 "project patch tokens; use vit_cls")
            return out.projection_mean
        return out.projection

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """The ``(backbone, projector)`` whose output is clustered (official ``forward_feature``).

        The target/momentum network where the method has one, else the online network.
        """
        raise NotImplementedError  # pragma: no cover - every method says which

    def cluster_embed(self, x: Tensor, embedding: str = "projection") -> Tensor:
        """L2-normalised float32 clustering input ``(B, embedding_dim(embedding))``.

        The projector output (``projection``, ``vit_cls``: of the ``[CLS]`` token), the backbone
        output (``backbone``) or the mean over patch tokens of their projections (``vit_mean``,
        the projector applied token-wise) of :meth:`clustering_encoder`. As for :meth:`embed`,
        the caller picks ``eval()`` and ``no_grad`` (official HIRL extracts in eval mode, on
        un-augmented images).
        """
        _check_embedding(embedding)
        backbone, projector = self.clustering_encoder()
        if embedding == "vit_mean":
            patches = backbone.tokens(x)[:, 1:]
            b, n, d = patches.shape
            z = projector(patches.reshape(b * n, d)).view(b, n, -1).mean(1)
            return F.normalize(z.float(), dim=1)
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


def split_weight_decay(named_params: Iterable[tuple[str, nn.Parameter]]
                       ) -> list[dict[str, Any]]:
    """Two groups: weights with weight decay, norms and biases without (and without LARS).

    Biases and normalisation parameters (every parameter with ``ndim <= 1``) get no weight
    decay and no LARS adaptation, as in BYOL (Grill et al. 2020, App. C.1) and SimCLR
    (Chen et al. 2020, App. B.1); DINO's ``get_params_groups`` splits the same way. Frozen
    parameters are left out.

    Args:
        named_params: E.g. ``module.named_parameters()``.

    Returns:
        ``[{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]``,
        leaving out a group that would be empty.
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``θ_target ← m·θ_target + (1 − m)·θ_online`` over parameters (MoCo Eq. 2, BYOL Sec. 3.1).

    Buffers (BN running statistics) are left alone, as in the official MoCo code: the target
    runs in train mode, so its BN uses batch statistics and its running stats are unused.
    """
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)
