"""Self-supervised base methods and the HIRL wrapper (no Ray imports here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hirl_ray.methods.base import MethodOutput, SSLMethod
from hirl_ray.methods.byol import BYOL
from hirl_ray.methods.hirl import HirlModel, StepOutput
from hirl_ray.methods.mocov2 import MoCoV2
from hirl_ray.methods.simclr import SimCLR
from hirl_ray.methods.simsiam import SimSiam
from hirl_ray.models import build_backbone

if TYPE_CHECKING:
    from hirl_ray.config import ExperimentConfig

METHODS: dict[str, type[SSLMethod]] = {
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "simsiam": SimSiam,
    "byol": BYOL,
}


def build_method(cfg: ExperimentConfig) -> SSLMethod:
    """The backbone of ``cfg.model`` at ``cfg.data.image_size`` wrapped in ``cfg.method``."""
    from hirl_ray.config import ConfigError

    if cfg.method.name not in METHODS:
        raise ConfigError(
            f"method.name must be one of {', '.join(METHODS)}, got {cfg.method.name!r}"
        )
    backbone, feat_dim = build_backbone(cfg.model, cfg.data.image_size)
    return METHODS[cfg.method.name](backbone, feat_dim, cfg.method)


__all__ = [
    "BYOL",
    "METHODS",
    "HirlModel",
    "MethodOutput",
    "MoCoV2",
    "SSLMethod",
    "SimCLR",
    "SimSiam",
    "StepOutput",
    "build_method",
]
