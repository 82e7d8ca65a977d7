"""Backbones and heads (no Ray imports here)."""

from hirl_ray.models.backbones import BACKBONES, SmallCNN, build_backbone, register_backbone
from hirl_ray.models.heads import mlp

__all__ = ["BACKBONES", "SmallCNN", "build_backbone", "mlp", "register_backbone"]
