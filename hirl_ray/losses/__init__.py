"""Losses as pure functions of tensors: no modules, no state, no collectives.

One concept per file (lightly's ``loss/`` layout); the methods call them and do any
cross-rank gathering themselves.
"""

from hirl_ray.losses.beit import masked_token_loss
from hirl_ray.losses.dino import dino_loss, update_center
from hirl_ray.losses.ibot import ibot_patch_loss
from hirl_ray.losses.info_nce import info_nce_loss
from hirl_ray.losses.mocov3 import mocov3_contrastive_loss
from hirl_ray.losses.nt_xent import nt_xent_loss
from hirl_ray.losses.regression import byol_loss, negative_cosine_loss
from hirl_ray.losses.semantic_path import sample_negative_paths, semantic_path_loss
from hirl_ray.losses.swav import sinkhorn, swav_loss

__all__ = [
    "byol_loss",
    "dino_loss",
    "ibot_patch_loss",
    "info_nce_loss",
    "masked_token_loss",
    "mocov3_contrastive_loss",
    "negative_cosine_loss",
    "nt_xent_loss",
    "sample_negative_paths",
    "semantic_path_loss",
    "sinkhorn",
    "swav_loss",
    "update_center",
]
