"""iBOT: the masked patch loss against a reference written from the paper, only masked tokens
count, mask ratios within bounds, both centres and temperatures, vit_mean, config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hirl_ray.config import ConfigError, ModelConfig, load_config
from hirl_ray.losses.dino import dino_loss
from hirl_ray.losses.ibot import ibot_patch_loss
from hirl_ray.methods import METHODS, HirlModel
from hirl_ray.methods.ibot import IBOT, IBOTConfig
from hirl_ray.models import build_backbone

torch.set_num_threads(1)

B, SIZE, LOCAL, GRID = 4, 16, 8, 4  # 4-px patches: a 4x4 grid per global crop


def make(seed: int = 0, **cfg) -> IBOT:
    torch.manual_seed(seed)
    knobs = {"out_dim": 32, "patch_out_dim": 32, "proj_dim": 8, "hidden_dim": 16,
             "num_local_crops": 2, "local_crop_size": LOCAL, **cfg}
    net, dim = build_backbone(ModelConfig(backbone="vit_tiny", patch_size=4), SIZE)
    return IBOT(net, dim, IBOTConfig(**knobs))


def views(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.rand(B, 3, SIZE, SIZE, generator=g) for _ in range(2)]
            + [torch.rand(B, 3, LOCAL, LOCAL, generator=g) for _ in range(2)])


def reference_patch_loss(student, teacher, masks, center, ts, tt) -> float:
    """iBOT Eq. 2 per crop, per image: Σ_masked H(P_t(u_i), P_s(û_i)) / #masked (0 if none)."""
    s, t, c = student.double().numpy(), teacher.double().numpy(), center.double().numpy()
    m = masks.numpy()
    total = 0.0
    for g in range(s.shape[0]):
        per_image = []
        for b in range(s.shape[1]):
            h = 0.0
            for i in np.flatnonzero(m[g, b]):
                pt = np.exp((t[g, b, i] - c) / tt)
                pt /= pt.sum()
                x = s[g, b, i] / ts
                log_ps = x - x.max() - np.log(np.exp(x - x.max()).sum())
                h += -(pt * log_ps).sum()
            per_image.append(h / max(m[g, b].sum(), 1))
        total += np.mean(per_image)
    return total / s.shape[0]


def test_patch_loss_equals_the_paper_and_counts_only_masked_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, 6, generator=g), torch.randn(2, 3, 5, 6, generator=g)
    masks = torch.rand(2, 3, 5, generator=g) < 0.5
    masks[0, 0] = False  # an unmasked image adds 0
    center = torch.randn(6, generator=g) * 0.1
    got = ibot_patch_loss(student, teacher, masks, center, 0.1, 0.04)
    assert got.item() == pytest.approx(
        reference_patch_loss(student, teacher, masks, center, 0.1, 0.04), rel=1e-5)
    # Changing an unmasked token's output changes nothing; a masked one's changes the loss.
    noise = torch.randn(student.shape, generator=g)
    moved = student + noise * (~masks).unsqueeze(-1)
    torch.testing.assert_close(ibot_patch_loss(moved, teacher, masks, center, 0.1, 0.04), got)
    moved = moved + noise * masks.unsqueeze(-1)
    assert not torch.isclose(ibot_patch_loss(moved, teacher, masks, center, 0.1, 0.04), got)
    s = student.clone().requires_grad_()
    ibot_patch_loss(s, teacher, masks, center, 0.1, 0.04).backward()
    assert s.grad[~masks].abs().max() == 0 and s.grad[masks].abs().max() > 0


def test_mask_ratios_are_zero_or_within_the_configured_range() -> None:
    m = make(pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2))
    torch.manual_seed(0)
    masks = torch.cat([m.draw_masks(32, 8) for _ in range(4)], dim=1)  # (2, 128, 64)
    ratios = masks.float().mean(-1).flatten()
    unmasked = ratios == 0
    assert 0.35 < unmasked.float().mean() < 0.65  # one of the two entries, uniformly
    # The block masker never overshoots its target and rounds it to whole patches.
    assert ratios[~unmasked].min() >= 0.05 and ratios[~unmasked].max() <= 0.5 + 1 / 64
    assert ratios[~unmasked].mean() > 0.2
    fixed = make(pred_ratio=(0.25,), pred_ratio_var=(0.0,)).draw_masks(8, 8)
    assert ((fixed.float().mean(-1) - 0.25).abs() <= 0.05).all()


def test_forward_is_cls_dino_plus_patch_loss_and_updates_both_centres() -> None:
    m = make(lambda1=0.7, lambda2=1.3).train()
    v = views()
    m.center.normal_()
    m.patch_center.normal_()
    c0, p0 = m.center.clone(), m.patch_center.clone()
    fixed = torch.zeros(2, B, GRID * GRID, dtype=torch.bool)
    fixed[:, :, 5:11] = True
    fixed[1, 0] = False
    m.draw_masks = lambda batch, grid: fixed
    out = m(v)
    with torch.no_grad():
        glob = torch.cat(v[:2])
        z = F.normalize(m.head.mlp(m.backbone.tokens(glob, fixed.view(2 * B, -1))), dim=-1)
        cls = torch.cat([m.head.last_layer(z[:, 0]), m.head(m.backbone(torch.cat(v[2:])))])
        tz = F.normalize(m.teacher_head.mlp(m.teacher_backbone.tokens(glob)), dim=-1)
        t_cls, t_patch = m.teacher_head.last_layer(tz[:, 0]), m.teacher_head.last_layer(tz[:, 1:])
        expected = (0.7 * dino_loss(cls.view(4, B, -1), t_cls.view(2, B, -1), c0, 0.1, 0.04)
                    + 1.3 * ibot_patch_loss(m.head.last_layer(z[:, 1:]).view(2, B, 16, -1),
                                            t_patch.view(2, B, 16, -1), fixed, p0, 0.1, 0.04))
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.center, 0.9 * c0 + 0.1 * t_cls.mean(0, keepdim=True))
    torch.testing.assert_close(m.patch_center,
                               0.9 * p0 + 0.1 * t_patch.mean(1).mean(0, keepdim=True))
    # HIRL inputs: [CLS] and patch-mean bottlenecks of the (masked) first global crop.
    zz = m.head.mlp(m.backbone.tokens(v[0], fixed[0]))
    torch.testing.assert_close(out.projection, zz[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.projection_mean, zz[:, 1:].mean(1), rtol=1e-4, atol=1e-5)


def test_eval_mode_masks_nothing() -> None:
    m = make().eval()
    m.draw_masks = lambda batch, grid: pytest.fail("eval must not draw masks")
    v = views()
    out = m(v)
    torch.testing.assert_close(out.embedding, m.backbone(v[0]))


def test_patch_temperature_warms_up_per_epoch() -> None:
    m = make(warmup_teacher_temp_epochs=5, warmup_teacher_patch_temp=0.02, patch_temp=0.06)
    official = np.concatenate([np.linspace(0.02, 0.06, 5), np.full(5, 0.06)])
    for epoch in (0, 2, 4, 9):
        m.on_step_start(epoch * 10, epoch, epoch / 10)
        assert m.patch_temp == pytest.approx(official[epoch])
        assert m.teacher_temp == pytest.approx(np.linspace(0.04, 0.07, 5)[min(epoch, 4)])


def test_separate_patch_head_and_last_layers_freeze() -> None:
    m = make(shared_head=False, patch_out_dim=24)
    assert m.head.last_layer2.weight_v.shape == (24, 8)
    assert m.teacher_head.last_layer2.weight_v.shape == (24, 8)
    m.train()(views()).loss.backward()
    m.after_backward(step=0, epoch=0)  # freeze_last_layer_epochs=3 by default
    assert all(p.grad is None for n, p in m.head.named_parameters() if n.startswith("last_layer"))
    assert m.head.mlp[0].weight.grad is not None
    m.update_target(0.5)  # the EMA covers the extra layer


@pytest.mark.parametrize("overrides, message", [
    ({"method.patch_out_dim": 512}, r"patch_out_dim \(512\) must equal method\.out_dim"),
    ({"method.pred_ratio": [0.3]}, "must be lists of one length"),
    ({"method.pred_ratio": [0.0, 0.1]}, r"pred_ratio ± pred_ratio_var must stay in \[0, 1\]"),
    ({"model.backbone": "small_cnn", "hirl.embedding": "projection"}, "ViT"),
])
def test_config_errors(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("experiments/small/ibot.yaml", overrides)


def test_registered_vit_mean_and_paper_config() -> None:
    assert METHODS["ibot"] is IBOT and "vit_mean" in IBOT.embeddings
    cfg = load_config("experiments/small/ibot.yaml", {"hirl.embedding": "vit_mean"})
    model = HirlModel.from_config(cfg)
    x = torch.rand(2, 3, 32, 32)
    assert model.eval().cluster_embed(x).shape == (2, 128)
    paper = load_config("experiments/paper/hirl_ibot_vit_b_16.yaml")
    assert paper.method.out_dim == paper.method.patch_out_dim == 8192
    assert paper.method.pred_ratio == (0.0, 0.3) and paper.hirl.num_clusters == (30000, 10000, 1000)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_one_worker_ibot_hirl_fit_on_ray(tmp_path) -> None:
    """iBOT + HIRL (vit_mean heads) through hirl_ray.fit: 2 epochs, HIRL from the second."""
    import hirl_ray
    from hirl_ray.train.checkpoint import find_checkpoints, read_meta

    result = hirl_ray.fit(None, {
        "data.image_size": 16, "data.train_per_class": 4, "data.test_per_class": 2,
        "model.backbone": "vit_tiny", "model.patch_size": 4,
        "method.name": "ibot", "method.hidden_dim": 32, "method.proj_dim": 16,
        "method.out_dim": 64, "method.patch_out_dim": 64, "method.num_local_crops": 2,
        "method.local_crop_size": 8, "method.warmup_teacher_temp_epochs": 1,
        "method.freeze_last_layer_epochs": 1,
        "hirl.num_clusters": [8, 4], "hirl.warmup_epochs": 1, "hirl.rebuild_every_epochs": 1,
        "hirl.num_neg_paths": 8, "hirl.kmeans_nredo": 1, "hirl.kmeans_iters": 5,
        "hirl.embedding": "vit_mean", "hirl.async_rebuild": False,
        "train.epochs": 2, "train.batch_size": 32, "train.num_workers": 1,
        "train.optimizer": "adamw", "train.lr": 0.001, "train.amp": False,
        "storage.path": str(tmp_path), "storage.name": "ibot",
    })
    metas = [read_meta(p) for p in find_checkpoints(result.run_dir)]
    assert [m.epoch for m in metas] == [1, 2]
    assert metas[-1].hierarchy_version >= 1 and metas[-1].metrics["hirl_active"]
    assert all(np.isfinite(m.metrics["loss"]) for m in metas)
    assert 0.0 <= result.metrics["knn_acc/superclass"] <= 1.0
