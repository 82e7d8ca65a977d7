"""HIRL wrapper: a base SSL method plus per-level semantic-path heads (Xu et al. 2022, Sec. 3.2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hirl_ray.methods.base import SSLMethod
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

    Level ``l``'s head maps the online backbone feature of ``views[0]`` to
    ``z_l = normalize(head_l(h))``; the semantic path loss (Eq. 4–6) scores ``z`` against the
    prototype tree. Centroids are k-means centres of L2-normalised ``method.embed`` features of
    un-augmented images, i.e. they live in the backbone feature space, so every head maps
    ``feat_dim → feat_dim``.

    Args:
        method: The base SSL method (owns the backbone).
        num_levels: Number of hierarchy levels (0 when HIRL is disabled: no heads).
        weight: λ, the weight of the semantic loss in the total (Eq. 7).
        num_neg_paths: Negative paths sampled per sample for the path loss.
    """

    def __init__(
        self, method: SSLMethod, num_levels: int, weight: float = 1.0, num_neg_paths: int = 100
    ) -> None:
        super().__init__()
        if num_levels < 0:
            raise ValueError(f"num_levels must be >= 0, got {num_levels}")
        self.method = method
        d = method.feat_dim
        self.heads = nn.ModuleList(mlp(d, d, d) for _ in range(num_levels))
        self.weight = float(weight)
        self.num_neg_paths = int(num_neg_paths)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> HirlModel:
        """Backbone + method from ``cfg``, with one head per ``hirl.num_clusters`` level."""
        from hirl_ray.methods import build_method

        levels = len(cfg.hirl.num_clusters) if cfg.hirl.enabled else 0
        return cls(build_method(cfg), levels, cfg.hirl.weight, cfg.hirl.num_neg_paths)

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
            from hirl_ray.hierarchy import semantic_path_loss

            if hierarchy.num_levels != len(self.heads):
                raise ValueError(
                    f"hierarchy has {hierarchy.num_levels} levels but the model has "
                    f"{len(self.heads)} heads; hirl.num_clusters changed since the "
                    "model was built"
                )
            z = [F.normalize(head(out.embedding), dim=1) for head in self.heads]
            semantic = semantic_path_loss(z, index, hierarchy, self.num_neg_paths, generator)
            loss = loss + self.weight * semantic
        elif len(self.heads) > 0:
            # DDP with find_unused_parameters=False requires every trainable parameter to get
            # a gradient on every rank in every step, or the all-reduce hangs/errors. During
            # warm-up the heads are unused, so tie them into the graph with a zero term.
            loss = loss + 0.0 * sum(p.sum() for p in self.heads.parameters())
        return StepOutput(
            loss=loss,
            method_loss=out.loss.detach(),
            semantic_loss=None if semantic is None else semantic.detach(),
        )

    @torch.no_grad()
    def update_target(self, progress: float) -> None:
        """Forward to the method's target/key-network update (after each optimiser step)."""
        self.method.update_target(progress)

    def embed(self, x: Tensor) -> Tensor:
        """Backbone features ``(B, feat_dim)``, the same as ``method.embed``."""
        return self.method.embed(x)
