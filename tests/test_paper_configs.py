"""The paper's seven HIRL configurations load through the strict loader with the paper's settings.

The expected values are the official ``configs/pretrain/hirl/hirl_<method>_*.yaml`` of
hirl-team/HIRL (Xu et al. 2022, Table 1/2 settings), written out here by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hirl_ray.config import load_config
from hirl_ray.methods import METHODS, HirlModel

PAPER = Path(__file__).resolve().parents[1] / "experiments" / "paper"

# file stem -> (method, backbone, num_clusters, num_neg_paths, warm-up epochs, epochs, embedding)
OFFICIAL = {
    "hirl_mocov2_resnet50": ("mocov2", "resnet50", (30000, 10000, 1000), 1000, 20, 200,
                             "projection"),
    "hirl_simsiam_resnet50": ("simsiam", "resnet50", (30000, 10000, 1000), 1000, 20, 200,
                              "projection"),
    "hirl_swav_resnet50": ("swav", "resnet50", (30000, 10000, 1000), 1000, 20, 200,
                           "projection"),
    "hirl_mocov3_vit_b_16": ("mocov3", "vit_b_16", (30000, 10000, 5000), 100, 40, 400,
                             "vit_cls"),
    "hirl_dino_vit_b_16": ("dino", "vit_b_16", (30000, 10000, 5000), 100, 40, 400, "vit_cls"),
    "hirl_ibot_vit_b_16": ("ibot", "vit_b_16", (30000, 10000, 1000), 100, 40, 400, "vit_cls"),
    "hirl_beit_vit_b_16": ("beit", "vit_b_16", (30000, 10000, 1000), 100, 40, 400, "vit_cls"),
}


def test_every_paper_method_has_a_config_and_nothing_else_is_there() -> None:
    assert {p.stem for p in PAPER.glob("*.yaml")} == set(OFFICIAL)


@pytest.mark.parametrize("stem", sorted(OFFICIAL))
def test_paper_config_loads_with_the_official_settings(stem: str) -> None:
    method, backbone, clusters, negatives, warmup, epochs, embedding = OFFICIAL[stem]
    cfg = load_config(PAPER / f"{stem}.yaml")
    assert cfg.method.name == method and type(cfg.method) is METHODS[method].Config
    assert cfg.model.backbone == backbone and cfg.data.image_size == 224
    h = cfg.hirl
    assert h.enabled and h.num_clusters == clusters and h.num_neg_paths == negatives
    assert h.warmup_epochs == warmup and cfg.train.epochs == epochs
    assert h.embedding == embedding and h.weight == 1.0
    assert cfg.train.use_gpu and cfg.data.root.startswith("s3://")
    if method == "mocov3":
        assert h.head_layers == 5  # official pipeline.num_mlp_layer
    assert h.iter_wise_assignment == (method == "swav")


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["hirl_dino_vit_b_16", "hirl_swav_resnet50"])
def test_paper_model_builds(stem: str) -> None:
    """The full-size model builds from the paper config (ViT-B/16 and ResNet-50 heads)."""
    cfg = load_config(PAPER / f"{stem}.yaml")
    model = HirlModel.from_config(cfg)
    assert len(model.heads) == 3
    assert sum(p.numel() for p in model.method.backbone.parameters()) > 20e6
