"""Backbones, heads and the multi-resolution forward (no Ray imports here)."""

from hirl_ray.models.backbones import BACKBONES, SmallCNN, build_backbone, register_backbone
from hirl_ray.models.heads import mlp
from hirl_ray.models.masking import block_mask, random_block_masks
from hirl_ray.models.multicrop import forward_by_resolution, resolution_groups
from hirl_ray.models.vit import ViT, vit_b_16, vit_tiny

__all__ = [
    "BACKBONES",
    "SmallCNN",
    "ViT",
    "block_mask",
    "build_backbone",
    "forward_by_resolution",
    "mlp",
    "random_block_masks",
    "register_backbone",
    "resolution_groups",
    "vit_b_16",
    "vit_tiny",
]
