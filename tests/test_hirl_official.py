"""Where HIRL follows the official code: which embedding the heads sit on and which one is
clustered (``hirl.embedding``), the head's shape, and heads left untouched during warm-up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hirl_ray.config import TrainConfig, load_config
from hirl_ray.methods import METHODS, HirlModel
from hirl_ray.runs import feature_dim
from hirl_ray.train.loop import StaticHierarchy, train_epoch
from hirl_ray.train.optim import build_optimizer
from tests.test_methods import BATCH, BUILTIN, FEAT_DIM, LEVELS, PROJ_DIM, make_method

torch.set_num_threads(1)

#: The network each method clusters (official ``forward_feature``): MoCo's key encoder, BYOL's
#: target; SimCLR, SimSiam and SwAV have none and cluster the online encoder.
CLUSTERED = {
    "simclr": ("backbone", "projector"),
    "simsiam": ("backbone", "projector"),
    "mocov2": ("key_backbone", "key_projector"),
    "byol": ("target_backbone", "target_projector"),
    "swav": ("backbone", "projector"),  # official HIRL-SwAV forward_feature: self.encoder
    "mocov3": ("key_backbone", "key_projector"),  # official forward_feature: encoder_k
    "dino": ("teacher_backbone", "teacher_head.mlp"),  # official: teacher.head.mlp(teacher(x))
}
#: The online projector, where the heads' ``projection`` comes from (DINO: its head's MLP).
ONLINE_PROJECTOR = {"dino": "head.mlp"}


def attr(obj: object, path: str) -> torch.nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def projector_of(method: torch.nn.Module, name: str) -> torch.nn.Module:
    return attr(method, ONLINE_PROJECTOR.get(name, "projector"))
#: Methods that see unmasked views (here on the small CNN); the masking methods (iBOT, BEiT)
#: test their embeddings in their own files.
UNMASKED = tuple(n for n in BUILTIN if not METHODS[n].needs_vit)


@pytest.fixture(scope="module")
def views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(BATCH, 3, 16, 16, generator=g)
    return [base + 0.1 * torch.randn(base.shape, generator=g) for _ in range(2)]


@pytest.mark.parametrize("name", UNMASKED)
def test_projection_is_the_online_projector_output_of_view_0(name, views) -> None:
    method = make_method(name).eval()  # eval: per-sample BN, so one view replays exactly
    out = method(views)
    assert out.projection.shape == (BATCH, PROJ_DIM) and out.projection.requires_grad
    with torch.no_grad():
        expected = projector_of(method, name)(method.backbone(views[0]))
    torch.testing.assert_close(out.projection.detach(), expected)
    assert out.embedding.shape == (BATCH, FEAT_DIM)


@pytest.mark.parametrize("name", UNMASKED)
@pytest.mark.parametrize(("embedding", "dim"), [("projection", PROJ_DIM), ("backbone", FEAT_DIM)])
def test_cluster_embed_uses_the_target_network_where_one_exists(name, embedding, dim, views):
    method = make_method(name).eval()
    assert method.embedding_dim(embedding) == dim
    backbone, projector = (attr(method, a) for a in CLUSTERED[name])
    online_projector = projector_of(method, name)
    with torch.no_grad():
        # Move the online network away from the target, as training does between EMA updates.
        for p in [*method.backbone.parameters(), *online_projector.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
        feats = method.cluster_embed(views[0], embedding)
        h = backbone(views[0])
        expected = F.normalize(h if embedding == "backbone" else projector(h), dim=1)
        online_h = method.backbone(views[0])
        online = online_h if embedding == "backbone" else online_projector(online_h)
    assert feats.shape == (BATCH, dim) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(BATCH))
    torch.testing.assert_close(feats, expected)
    has_target = CLUSTERED[name][0] != "backbone"
    assert torch.allclose(feats, F.normalize(online, dim=1), atol=1e-4) != has_target
    with pytest.raises(ValueError, match="hirl.embedding must be one of"):
        method.cluster_embed(views[0], "cnn")


@pytest.mark.parametrize(("embedding", "dim"), [("projection", PROJ_DIM), ("backbone", FEAT_DIM)])
def test_heads_are_the_official_mlp_on_the_chosen_embedding(embedding, dim, views) -> None:
    # Official: layers.MLP(d, [d, d], batch_norm=True) = Linear(d, d, bias=False), BN(d), ReLU,
    # Linear(d, d): 2 d^2 + 3 d parameters per level.
    model = HirlModel(make_method("mocov2"), len(LEVELS), embedding=embedding)
    for head in model.heads:
        linears = [m for m in head if isinstance(m, nn.Linear)]
        norms = [m for m in head if isinstance(m, nn.BatchNorm1d)]
        assert [tuple(m.weight.shape) for m in linears] == [(dim, dim), (dim, dim)]
        assert linears[0].bias is None and linears[1].bias is not None
        assert len(norms) == 1 and norms[0].num_features == dim and norms[0].affine
        assert sum(p.numel() for p in head.parameters()) == 2 * dim * dim + 3 * dim
    assert model.cluster_embed(views[0]).shape == (BATCH, dim)


@pytest.mark.parametrize(("embedding", "dim"), [("projection", 128), ("backbone", 256)])
def test_config_chooses_heads_and_the_clustered_width(embedding, dim) -> None:
    cfg = load_config(None, {"hirl.embedding": embedding})
    model = HirlModel.from_config(cfg)
    assert model.embedding == embedding and model.neg_average == "per_sample"
    assert all(h[0].in_features == dim for h in model.heads)
    assert feature_dim(cfg) == dim  # what the rebuild memory estimate uses


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_warmup_leaves_heads_bit_identical(optimizer, views) -> None:
    model = HirlModel(make_method("simclr"), len(LEVELS))
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    backbone_before = [p.detach().clone() for p in model.method.backbone.parameters()]
    params = [p for p in model.parameters() if p.requires_grad]
    # Weight decay and momentum would move parameters with a zero gradient; warm-up must not.
    opt = build_optimizer(params, TrainConfig(optimizer=optimizer, lr=0.1, weight_decay=0.1))
    loader = [(views, torch.arange(BATCH))] * 3
    stats, step = train_epoch(
        model, loader, opt, epoch=0, step=0, total_steps=10, base_lr=0.1, warmup_steps=0,
        hierarchy=StaticHierarchy(None), device=torch.device("cpu"),
    )
    assert step == 3 and stats.semantic_steps == 0
    for k, v in model.heads.state_dict().items():
        assert torch.equal(v, heads_before[k]), k
    assert all(p.grad is None for p in model.heads.parameters())
    moved = [not torch.equal(a, b) for a, b in
             zip(backbone_before, model.method.backbone.parameters(), strict=True)]
    assert any(moved)  # the rest of the model did train


def test_resuming_with_another_embedding_is_refused(tmp_path) -> None:
    # The heads' width depends on hirl.embedding: a checkpoint of one cannot load into the other.
    from hirl_ray.api import prepare_run
    from hirl_ray.config import ConfigError

    prepare_run(load_config(None, {"storage.path": str(tmp_path)}))
    with pytest.raises(ConfigError, match="hirl.embedding='backbone' differs from 'projection'"):
        prepare_run(
            load_config(None, {"storage.path": str(tmp_path), "hirl.embedding": "backbone"})
        )
