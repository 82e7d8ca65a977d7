"""Backbones, heads and the multi-resolution forward (no Ray imports here)."""

from hirl_ray.models.backbones import BACKBONES, SmallCNN, build_backbone, register_backbone
from hirl_ray.models.heads import mlp
from hirl_ray.models.multicrop import forward_by_resolution, resolution_groups

__all__ = [
    "BACKBONES",
    "SmallCNN",
    "build_backbone",
    "forward_by_resolution",
    "mlp",
    "register_backbone",
    "resolution_groups",
]
