"""HIRL wrapper: a base SSL method plus per-level semantic-path heads (Xu et al. 2022, Sec. 3.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hirl_ray.losses.semantic_path import semantic_path_loss
from hirl_ray.methods.base import SSLMethod, build_method
from hirl_ray.models.heads import mlp

if TYPE_CHECKING:
    from hirl_ray.config import ExperimentConfig
    from hirl_ray.hierarchy import PrototypeHierarchy


@dataclass
class StepOutput:
    """One training step's losses.

    Attributes:
        loss: Total loss to back-propagate: method loss + ``weight`` × semantic loss.
        method_loss: The base method's loss (detached, for logging).
        semantic_loss: The semantic path loss (detached); ``None`` when HIRL is inactive.
    """

    loss: Tensor
    method_loss: Tensor
    semantic_loss: Tensor | None


class HirlModel(nn.Module):
    """Base SSL method + HIRL per-level projection heads (HIRL Sec. 3.2, Eq. 7).

    Level ``l``'s head maps the online embedding of ``views[0]`` to
    ``z_l = normalize(head_l(e))``; the semantic path loss (Eq. 4-6) scores ``z`` against the
    prototype tree, whose centroids are k-means centres of :meth:`cluster_embed` features (the
    same kind of embedding, from the target network where the method has one). Which embedding
    is ``hirl.embedding``:

    * ``projection`` (official): ``e`` is the projector output (MoCo v2: 128-d, SimSiam:
      2048-d) and the clustered features are the target's (else online) projector output;
    * ``backbone``: ``e`` and the clustered features are backbone outputs (ResNet-50: 2048-d);
    * ``vit_cls`` (ViTs, official): the projection of the ``[CLS]`` token, as ``projection``;
    * ``vit_mean`` (ViTs, methods that project patch tokens): the mean over patch tokens of
      their projections.

    Cost, with ``d`` the embedding width and ``D`` the clustered width (here ``d = D``): each
    head is the official ``layers.MLP(d, [d, d], batch_norm=True)``, i.e. Linear(d, d, no bias)
    -BN-ReLU-Linear(d, d), ``2 d^2 + 3 d`` parameters (33k at d = 128, 8.4M at d = 2048: 3
    heads of 25M); k-means work and memory grow ∝ ``D`` (16x from 128 to 2048).

    Args:
        method: The base SSL method (owns the backbone).
        num_levels: Number of hierarchy levels (0 when HIRL is disabled: no heads).
        weight: λ, the weight of the semantic loss in the total (Eq. 7; official: 1).
        num_neg_paths: Negative paths sampled per sample for the path loss.
        embedding: ``hirl.embedding`` (``projection``, ``backbone``, ``vit_cls``, ``vit_mean``).
        neg_average: ``hirl.neg_average``, ``"per_sample"`` (official) or ``"pooled"``.
        iter_wise_assignment: ``hirl.iter_wise_assignment``: each step re-assigns its samples
            to the level-0 prototype nearest to the clustering features of ``views[1]``
            (official HIRL-SwAV); the positive path follows that prototype's parents.
        head_layers: ``hirl.head_layers``, Linear layers per head (official ``num_mlp_layer``).
    """

    def __init__(
        self,
        method: SSLMethod,
        num_levels: int,
        weight: float = 1.0,
        num_neg_paths: int = 100,
        embedding: str = "projection",
        neg_average: str = "per_sample",
        iter_wise_assignment: bool = False,
        head_layers: int = 2,
    ) -> None:
        super().__init__()
        if num_levels < 0:
            raise ValueError(f"num_levels must be >= 0, got {num_levels}")
        self.method = method
        self.embedding = embedding
        d = method.embedding_dim(embedding)
        self.heads = nn.ModuleList(mlp(d, d, d, num_layers=head_layers) for _ in range(num_levels))
        self.weight = float(weight)
        self.num_neg_paths = int(num_neg_paths)
        self.neg_average = neg_average
        self.iter_wise_assignment = iter_wise_assignment

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> HirlModel:
        """Backbone + method from ``cfg``, with one head per ``hirl.num_clusters`` level."""
        h = cfg.hirl
        levels = len(h.num_clusters) if h.enabled else 0
        return cls(build_method(cfg), levels, h.weight, h.num_neg_paths, h.embedding,
                   h.neg_average, h.iter_wise_assignment, h.head_layers)

    def forward(
        self,
        views: list[Tensor],
        index: Tensor,
        hierarchy: PrototypeHierarchy | None = None,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """Method loss, plus the weighted semantic path loss when a hierarchy is given.

        Args:
            views: Augmented views, each ``(B, 3, H, W)``.
            index: ``(B,)`` dataset indices of the samples (rows of ``hierarchy.assignments``).
            hierarchy: The current prototype tree, or ``None`` during warm-up / without HIRL.
            generator: RNG for negative-path sampling (reproducibility).
        """
        out = self.method(views)
        loss = out.loss
        semantic: Tensor | None = None
        if hierarchy is not None and len(self.heads) > 0:
            if hierarchy.num_levels != len(self.heads):
                raise ValueError(
                    f"hierarchy has {hierarchy.num_levels} levels but the model has "
                    f"{len(self.heads)} heads; hirl.num_clusters changed since the "
                    "model was built"
                )
            e = self.method.hirl_input(out, self.embedding)
            z = [F.normalize(head(e), dim=1) for head in self.heads]
            leaf = self.nearest_leaf(views[1], hierarchy) if self.iter_wise_assignment else None
            semantic = semantic_path_loss(
                z, index, hierarchy, self.num_neg_paths, generator, neg_average=self.neg_average,
                leaf=leaf,
            )
            loss = loss + self.weight * semantic
        elif len(self.heads) > 0:
            # DDP with find_unused_parameters=False requires every trainable parameter to get
            # a gradient on every rank in every step, or the all-reduce hangs/errors. During
            # warm-up the heads are unused, so tie them into the graph with a zero term; the
            # loop then drops those zero gradients (drop_head_grads) before the step.
            loss = loss + 0.0 * sum(p.sum() for p in self.heads.parameters())
        return StepOutput(
            loss=loss,
            method_loss=out.loss.detach(),
            semantic_loss=None if semantic is None else semantic.detach(),
        )

    @torch.no_grad()
    def nearest_leaf(self, x: Tensor, hierarchy: PrototypeHierarchy) -> Tensor:
        """``(B,)`` level-0 prototype nearest (cosine) to the clustering features of ``x``.

        Official ``iter_wise_assignment`` (``runners/pretrain/hirl.py``): ``forward_feature`` of
        the second view in the current (training) mode, argmax over the level-0 centroids.
        """
        feats = self.method.cluster_embed(x, self.embedding)
        centroids = F.normalize(hierarchy.centroids[0].to(feats.device, torch.float32), dim=1)
        return (feats.float() @ centroids.T).argmax(dim=1)

    def param_groups(self) -> list[dict[str, Any]]:
        """The method's parameter groups, plus one group of the HIRL heads (when any).

        The heads' group has no special keys: like the official HIRL code, they train with the
        base learning rate schedule and ``train.weight_decay``.
        """
        groups = self.method.param_groups()
        heads = [p for p in self.heads.parameters() if p.requires_grad]
        return groups + [{"params": heads}] if heads else groups

    def on_step_start(self, step: int, epoch: int, progress: float) -> None:
        """Forward to the method's hook (before the step's forward)."""
        self.method.on_step_start(step, epoch, progress)

    def after_backward(self, step: int, epoch: int) -> None:
        """Forward to the method's hook (after backward, before the optimiser step)."""
        self.method.after_backward(step, epoch)

    @torch.no_grad()
    def update_target(self, progress: float) -> None:
        """Forward to the method's target/key-network update (after each optimiser step)."""
        self.method.update_target(progress)

    def drop_head_grads(self) -> None:
        """Set the heads' gradients to ``None``: call after a backward without semantic loss.

        In warm-up the official heads are unused parameters (DDP ``find_unused_parameters``),
        get no gradient and are skipped by the optimiser: untouched. Ours get a zero gradient
        (for DDP, see :meth:`forward`), which SGD's weight decay and momentum (and AdamW's
        decoupled decay) would still turn into updates; with ``None`` every optimiser skips them.
        """
        for p in self.heads.parameters():
            p.grad = None

    def embed(self, x: Tensor) -> Tensor:
        """Backbone features ``(B, feat_dim)`` for kNN/linear evaluation (``method.embed``)."""
        return self.method.embed(x)

    def cluster_embed(self, x: Tensor) -> Tensor:
        """The features the hierarchy is built from: ``method.cluster_embed`` (``hirl.embedding``).

        L2-normalised, ``(B, method.embedding_dim(hirl.embedding))``.
        """
        return self.method.cluster_embed(x, self.embedding)
