"""MoCo v3: the loss against Algorithm 1 of the paper, per-view BN, the cosine momentum EMA,
the official heads, the frozen patch embedding and sin-cos position embedding, configs, and
one Ray fit with HIRL."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hirl_ray.config import ConfigError, ModelConfig, load_config
from hirl_ray.losses import mocov3_contrastive_loss
from hirl_ray.methods import MoCoV3, MoCoV3Config
from hirl_ray.models import build_backbone

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SIZE, B = 16, 8


def make(vit: bool = True, **knobs) -> MoCoV3:
    torch.manual_seed(0)
    cfg = MoCoV3Config(proj_dim=16, hidden_dim=32, **knobs)
    model = (ModelConfig(backbone="vit_tiny", patch_size=4) if vit
             else ModelConfig(backbone="small_cnn", width=8))
    backbone, feat_dim = build_backbone(model, SIZE)
    return MoCoV3(backbone, feat_dim, cfg)


def views(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(B, 3, SIZE, SIZE, generator=g)
    return [base + 0.1 * torch.randn(base.shape, generator=g) for _ in range(2)]


def ctr_reference(q: torch.Tensor, k: torch.Tensor, tau: float, offset: int = 0) -> float:
    """Algorithm 1's ``ctr`` written out per query: −log softmax of the positive, mean, ×2τ."""
    total = 0.0
    for i, qi in enumerate(q.double()):
        qi = qi / qi.norm()
        sims = [float(qi @ (kj / kj.norm())) / tau for kj in k.double()]
        top = max(sims)
        log_denominator = top + math.log(sum(math.exp(s - top) for s in sims))
        total += log_denominator - sims[offset + i]
    return total / q.shape[0] * 2 * tau


@pytest.mark.parametrize("offset", [0, 5])
def test_loss_equals_the_papers_pseudocode(offset: int) -> None:
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(5, 7, generator=g), torch.randn(offset + 5 + 3, 7, generator=g)
    got = mocov3_contrastive_loss(q, k, 0.2, offset)
    assert got.item() == pytest.approx(ctr_reference(q, k, 0.2, offset), rel=1e-5)
    # The positive must be row offset + i: a shifted offset scores other keys.
    assert mocov3_contrastive_loss(q, k, 0.2, offset + 1).item() != pytest.approx(got.item())


@pytest.mark.parametrize("vit", [True, False], ids=["vit", "cnn"])
def test_method_loss_is_symmetric_ctr_with_a_forward_per_view(vit: bool) -> None:
    # Train mode: BN normalises each view's batch on its own, as the official code's one pass
    # per view (a pass over both views at once gives other statistics and fails here).
    m = make(vit)
    x = views()
    with torch.no_grad():
        got = m(x).loss.item()
        q = [m.predictor(m.projector(m.backbone(v))) for v in x]
        k = [m.key_projector(m.key_backbone(v)) for v in x]
    expected = ctr_reference(q[0], k[1], 0.2) + ctr_reference(q[1], k[0], 0.2)
    assert got == pytest.approx(expected, rel=1e-4)


def test_heads_follow_the_official_mocov3() -> None:
    def linears(seq):
        return [layer for layer in seq if isinstance(layer, torch.nn.Linear)]

    vit, cnn = make(vit=True), make(vit=False)
    assert len(linears(vit.projector)) == 3 and len(linears(cnn.projector)) == 2
    assert all(layer.bias is None for h in (vit.projector, vit.predictor, cnn.predictor)
               for layer in linears(h))
    for head in (vit.projector, cnn.projector, vit.predictor):  # non-affine last BN
        assert isinstance(head[-1], torch.nn.BatchNorm1d) and not head[-1].affine
    assert isinstance(cnn.predictor[-1], torch.nn.Linear)  # MoCo_ResNet: last_bn=False
    assert len(linears(make(vit=False, proj_layers=3).projector)) == 3


@pytest.mark.parametrize("cosine", [True, False])
def test_momentum_encoder_follows_the_ema_with_the_cosine_schedule(cosine: bool) -> None:
    m = make(momentum=0.9, momentum_cosine=cosine)
    online = [*m.backbone.parameters(), *m.projector.parameters()]
    target = [*m.key_backbone.parameters(), *m.key_projector.parameters()]
    assert all(not p.requires_grad for p in target)
    assert all(torch.equal(a, b) for a, b in zip(online, target, strict=True))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    for progress in (0.0, 0.25, 0.5, 1.0):
        m(views()).loss.backward()
        opt.step()
        opt.zero_grad()
        before = [t.clone() for t in target]
        m.update_target(progress)
        # Official adjust_moco_momentum: 1 − (1 + cos(π·epoch/epochs))/2 · (1 − m0).
        mom = 1 - (1 + math.cos(math.pi * progress)) / 2 * 0.1 if cosine else 0.9
        for t, t0, o in zip(target, before, online, strict=True):
            torch.testing.assert_close(t, mom * t0 + (1 - mom) * o, rtol=1e-5, atol=1e-6)
    assert mom == (1.0 if cosine else 0.9)
    assert not any(n.startswith("key_predictor") for n, _ in m.named_parameters())


def test_frozen_patch_embedding_and_sincos_position_embedding_do_not_move() -> None:
    frozen, free = make(freeze_patch_embed=True), make(freeze_patch_embed=False)
    side = frozen.backbone.grid
    pos = frozen.backbone.pos_embedding[0]
    # Token (row 1, col 2), width 192: [sin(rω), cos(rω), sin(cω), cos(cω)], ω_i = 1e4^(−i/48).
    omega = torch.tensor([10000 ** (-i / 48) for i in range(48)])
    token = pos[1 + 1 * side + 2]
    torch.testing.assert_close(token, torch.cat([torch.sin(omega), torch.cos(omega),
                                                 torch.sin(2 * omega), torch.cos(2 * omega)]))
    assert torch.equal(pos[0], torch.zeros(192))
    for m in (frozen, free):
        start = {n: p.clone() for n, p in m.backbone.named_parameters()}
        opt = torch.optim.AdamW([p for g in m.param_groups() for p in g["params"]], lr=1e-2,
                                weight_decay=0.1)
        for _ in range(2):
            m(views()).loss.backward()
            opt.step()
            opt.zero_grad()
        moved = {n for n, p in m.backbone.named_parameters() if not torch.equal(p, start[n])}
        assert "pos_embedding" not in moved and "blocks.0.mlp.0.weight" in moved
        assert ("conv_proj.weight" in moved) is (m is free)


def test_config_checks_name_the_key() -> None:
    with pytest.raises(ConfigError, match="method.freeze_patch_embed needs a ViT"):
        load_config(None, {"method.name": "mocov3", "method.freeze_patch_embed": True})
    with pytest.raises(ConfigError, match=r"method.crop_scale must satisfy"):
        load_config(None, {"method.name": "mocov3", "method.crop_scale": [0.5, 0.2]})
    cfg = load_config(None, {"method.name": "mocov3", "data.image_size": 24})
    tf = MoCoV3(*build_backbone(cfg.model, 24), cfg.method).transform(cfg.data)
    out = tf((torch.rand(3, 40, 40) * 255).to(torch.uint8))
    assert [v.shape for v in out] == [torch.Size([3, 24, 24])] * 2


def test_paper_config_loads_with_the_official_values() -> None:
    cfg = load_config(ROOT / "experiments" / "paper" / "hirl_mocov3_vit_b_16.yaml")
    assert cfg.model.backbone == "vit_b_16" and cfg.train.use_gpu and cfg.model.sync_bn
    assert cfg.hirl.num_clusters == (30000, 10000, 5000) and cfg.hirl.num_neg_paths == 100
    assert (cfg.hirl.warmup_epochs, cfg.hirl.embedding) == (40, "vit_cls")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.optimizer) == (400, 4096, "adamw")
    assert cfg.train.lr == pytest.approx(1.5e-4 * 4096 / 256) and cfg.train.weight_decay == 0.1
    assert cfg.train.warmup_lr_epochs == 40 and cfg.method.crop_scale == (0.08, 1.0)
    assert cfg.method.temperature == 0.2 and cfg.method.momentum == 0.99


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_ray_fit_with_hirl(tmp_path) -> None:
    import hirl_ray
    from hirl_ray.train.checkpoint import find_checkpoints, read_meta

    from .conftest import tiny_config

    result = hirl_ray.fit(None, tiny_config(tmp_path, **{
        "method.name": "mocov3", "model.backbone": "vit_tiny", "model.patch_size": 8,
        "hirl.embedding": "vit_cls", "train.epochs": 2, "train.num_workers": 1,
        "train.optimizer": "adamw", "train.lr": 1e-3, "train.weight_decay": 0.1}))
    metas = [read_meta(p) for p in find_checkpoints(Path(result.run_dir))]
    assert [m.epoch for m in metas] == [1, 2]
    assert metas[-1].hierarchy_version >= 1 and metas[-1].metrics["hirl_active"]
    assert 0.0 <= result.metrics["knn_acc/superclass"] <= 1.0
