"""Self-supervised base methods and the HIRL wrapper (no Ray imports here).

A method is one file here: its class (``@register_method``) with its ``Config`` dataclass next
to it, its views (``transform``), parameter groups and step hooks; plus a preset experiment
``experiments/methods/<name>.yaml``. Importing this package registers the built-in ones in
``hirl_ray.config.METHODS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hirl_ray.config import METHODS
from hirl_ray.methods.base import (
    MethodOutput,
    ProjectorConfig,
    SSLMethod,
    register_method,
    split_weight_decay,
)
from hirl_ray.methods.byol import BYOL, BYOLConfig
from hirl_ray.methods.hirl import HirlModel, StepOutput
from hirl_ray.methods.mocov2 import MoCoV2, MoCoV2Config
from hirl_ray.methods.simclr import SimCLR, SimCLRConfig
from hirl_ray.methods.simsiam import SimSiam, SimSiamConfig
from hirl_ray.models import build_backbone

if TYPE_CHECKING:
    from hirl_ray.config import ExperimentConfig


def build_method(cfg: ExperimentConfig) -> SSLMethod:
    """The backbone of ``cfg.model`` at ``cfg.data.image_size`` wrapped in ``cfg.method``."""
    cls = METHODS.get(cfg.method.name)
    backbone, feat_dim = build_backbone(cfg.model, cfg.data.image_size)
    return cls(backbone, feat_dim, cfg.method)


__all__ = [
    "BYOL",
    "BYOLConfig",
    "METHODS",
    "HirlModel",
    "MethodOutput",
    "MoCoV2",
    "MoCoV2Config",
    "ProjectorConfig",
    "SSLMethod",
    "SimCLR",
    "SimCLRConfig",
    "SimSiam",
    "SimSiamConfig",
    "StepOutput",
    "build_method",
    "register_method",
    "split_weight_decay",
]
