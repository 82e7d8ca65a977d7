"""Self-supervised base methods and the HIRL wrapper (no Ray imports here).

A method is one file here: its class (``@register_method``) with its ``Config`` dataclass next
to it, its views (``transform``), parameter groups and step hooks; plus a preset experiment
``experiments/small/<name>.yaml``. Importing this package imports every module in it, which
registers the built-in methods in ``hirl_ray.config.METHODS``; the imports below only re-export.
"""

from __future__ import annotations

import importlib
import pkgutil

from hirl_ray.config import METHODS
from hirl_ray.methods.base import (
    MethodOutput,
    ProjectorConfig,
    SSLMethod,
    build_method,
    register_method,
    split_weight_decay,
)
from hirl_ray.methods.beit import BEiT, BEiTConfig
from hirl_ray.methods.byol import BYOL, BYOLConfig
from hirl_ray.methods.dino import DINO, DINOConfig
from hirl_ray.methods.hirl import HirlModel, StepOutput
from hirl_ray.methods.ibot import IBOT, IBOTConfig
from hirl_ray.methods.mocov2 import MoCoV2, MoCoV2Config
from hirl_ray.methods.mocov3 import MoCoV3, MoCoV3Config
from hirl_ray.methods.simclr import SimCLR, SimCLRConfig
from hirl_ray.methods.simsiam import SimSiam, SimSiamConfig
from hirl_ray.methods.swav import SwAV, SwAVConfig


def _import_every_module() -> None:
    """Import each module of this package, so a new file here registers itself (no edit here)."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_every_module()


__all__ = [
    "BEiT",
    "BEiTConfig",
    "BYOL",
    "BYOLConfig",
    "DINO",
    "DINOConfig",
    "METHODS",
    "HirlModel",
    "IBOT",
    "IBOTConfig",
    "MethodOutput",
    "MoCoV2",
    "MoCoV2Config",
    "MoCoV3",
    "MoCoV3Config",
    "ProjectorConfig",
    "SSLMethod",
    "SimCLR",
    "SimCLRConfig",
    "SimSiam",
    "SimSiamConfig",
    "StepOutput",
    "SwAV",
    "SwAVConfig",
    "build_method",
    "register_method",
    "split_weight_decay",
]
