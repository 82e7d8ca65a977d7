"""Backbones and heads: shapes, advertised feature sizes, the small stem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hirl_ray.config import ConfigError, ModelConfig
from hirl_ray.models import BACKBONES, build_backbone, mlp

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "name, width, expected",
    [("small_cnn", 16, 64), ("small_cnn", 64, 256), ("resnet18", 64, 512), ("resnet50", 64, 2048)],
)
def test_backbone_returns_advertised_feat_dim(name: str, width: int, expected: int) -> None:
    assert name in BACKBONES
    net, feat_dim = build_backbone(ModelConfig(backbone=name, width=width), image_size=32)
    assert feat_dim == expected
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, feat_dim)
    assert torch.isfinite(out).all()


def test_small_cnn_handles_other_sizes_and_backprops() -> None:
    net, d = build_backbone(ModelConfig(backbone="small_cnn", width=16), image_size=16)
    x = torch.randn(4, 3, 16, 16)
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    big, d_big = build_backbone(ModelConfig(backbone="small_cnn", width=16), image_size=96)
    assert d_big == d and big(torch.randn(2, 3, 96, 96)).shape == (2, d)


def test_small_stem_replaces_conv1_and_maxpool() -> None:
    small, _ = build_backbone(ModelConfig(backbone="resnet18", small_stem=True), image_size=224)
    large, _ = build_backbone(ModelConfig(backbone="resnet18", small_stem=False), image_size=224)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)
    # Small images get the small stem even when small_stem is off.
    auto, _ = build_backbone(ModelConfig(backbone="resnet18", small_stem=False), image_size=32)
    assert auto.conv1.kernel_size == (3, 3) and isinstance(auto.maxpool, nn.Identity)
    assert isinstance(small.fc, nn.Identity)


def test_unknown_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="model.backbone"):
        build_backbone(ModelConfig(backbone="vit"), image_size=32)


@pytest.mark.parametrize("num_layers, last_bn", [(1, False), (2, False), (3, True)])
def test_mlp_shapes_and_structure(num_layers: int, last_bn: bool) -> None:
    head = mlp(12, 20, 7, num_layers=num_layers, last_bn=last_bn)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert len(linears) == num_layers
    assert linears[0].in_features == 12 and linears[-1].out_features == 7
    assert all(lin.out_features == 20 for lin in linears[:-1])
    assert isinstance(head[-1], nn.BatchNorm1d) == last_bn
    out = head(torch.randn(5, 12))
    assert out.shape == (5, 7)
    if last_bn:  # non-affine BN in train mode: zero-mean outputs per feature
        assert torch.allclose(out.mean(0), torch.zeros(7), atol=1e-5)
    with pytest.raises(ValueError):
        mlp(4, 4, 4, num_layers=0)


class _Counting(nn.Module):
    """Sums pixels per image (any size) and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return x.flatten(1).sum(1, keepdim=True)


def test_forward_by_resolution_one_pass_per_group_in_view_order() -> None:
    from hirl_ray.models import forward_by_resolution, resolution_groups

    big = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    small = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    views = [*big, *small]
    assert resolution_groups(views) == [(0, 2), (2, 5)]
    net = _Counting()
    out = forward_by_resolution(net, views)
    assert net.calls == [4, 6]  # 2 global views in one pass, 3 local in another
    expected = torch.cat([net.forward(v) for v in views])
    torch.testing.assert_close(out, expected)
    # Non-consecutive sizes stay separate groups, so the order is kept.
    assert resolution_groups([big[0], small[0], big[1]]) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="at least one view"):
        forward_by_resolution(net, [])


def test_forward_by_resolution_of_two_equal_views_is_one_cat_pass() -> None:
    from hirl_ray.models import forward_by_resolution

    net, _ = build_backbone(ModelConfig(backbone="small_cnn", width=8), image_size=16)
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    torch.testing.assert_close(forward_by_resolution(net, views), net(torch.cat(views)))


# ---- ViTs, block masks, multi-crop ------------------------------------------------------------

def _tiny_tv_vit(image_size: int = 32, patch: int = 8):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=image_size, patch_size=patch, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64)


def test_vit_cls_output_is_torchvisions_at_the_native_size() -> None:
    from hirl_ray.models import ViT

    net = _tiny_tv_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = net.encoder(torch.cat([net.class_token.expand(3, -1, -1),
                                          net._process_input(x)], dim=1))[:, 0]
        ours = ViT(net).eval()(x)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_vit_takes_other_sizes_and_refuses_sizes_off_the_patch_grid() -> None:
    from hirl_ray.models import ViT

    vit = ViT(_tiny_tv_vit()).eval()
    assert vit.tokens(torch.randn(2, 3, 16, 16)).shape == (2, 1 + 4, 32)
    assert vit.tokens(torch.randn(2, 3, 48, 48)).shape == (2, 1 + 36, 32)
    with pytest.raises(ValueError, match="multiple of the ViT patch size 8"):
        vit(torch.randn(1, 3, 20, 20))


def test_vit_masked_patches_no_longer_see_the_image() -> None:
    from hirl_ray.models import ViT

    vit = ViT(_tiny_tv_vit()).eval()
    a, b = torch.randn(2, 1, 3, 32, 32)
    with pytest.raises(RuntimeError, match="enable_masking"):
        vit.tokens(a, torch.ones(1, 16, dtype=torch.bool))
    vit.enable_masking()
    everything = torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(vit.tokens(a, everything), vit.tokens(b, everything))
        assert not torch.allclose(vit.tokens(a), vit.tokens(b))


def test_vit_drop_path_is_random_in_training_only() -> None:
    from hirl_ray.models import ViT

    vit = ViT(_tiny_tv_vit(), drop_path=0.5)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        vit.train()
        assert not torch.allclose(vit(x), vit(x))
        vit.eval()
        torch.testing.assert_close(vit(x), vit(x))


def test_vit_backbones_build_from_config() -> None:
    vit, dim = build_backbone(ModelConfig(backbone="vit_tiny"), 32)
    assert dim == 192 and vit.patch_size == 4 and vit(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    with pytest.raises(ConfigError, match="model.patch_size .5. must divide data.image_size"):
        build_backbone(ModelConfig(backbone="vit_tiny", patch_size=5), 32)


def test_block_masks_hit_their_ratio_and_repeat_with_the_seed() -> None:
    from hirl_ray.models import block_mask, random_block_masks

    for n in (0, 5, 30, 64):
        m = block_mask(8, 8, n, torch.Generator().manual_seed(n))
        assert m.shape == (8, 8) and int(m.sum()) <= n
        assert int(m.sum()) >= 0.6 * n  # blocks may stop short, never far short
    masks = random_block_masks(16, 8, (0.2, 0.5), torch.Generator().manual_seed(1))
    ratios = masks.float().mean(1)
    assert masks.shape == (16, 64) and bool((ratios <= 0.5 + 1e-6).all())
    assert float(ratios.mean()) > 0.15
    again = random_block_masks(16, 8, (0.2, 0.5), torch.Generator().manual_seed(1))
    assert torch.equal(masks, again)
    assert not random_block_masks(2, 8, (0.0, 0.0)).any()
    with pytest.raises(ValueError, match="mask ratio range"):
        random_block_masks(2, 8, (0.5, 0.2))


def test_multi_crop_gives_global_then_local_views() -> None:
    from hirl_ray.data.transforms import multi_crop_transform

    t = multi_crop_transform(32, 16, num_global=2, num_local=4)
    views = t(torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    with pytest.raises(ValueError, match="local crop scale"):
        multi_crop_transform(32, 16, local_scale=(0.5, 0.2))


def test_byol_style_views_are_the_asymmetric_pair() -> None:
    """DINO/MoCo v3 views: view 1 always blurred, view 2 solarised with p = 0.2; locals p = 0.5."""
    from torchvision.transforms import v2

    from hirl_ray.data.transforms import multi_crop_transform

    def ops(pipeline, kind):
        return [(op.p, type(t).__name__) for op in pipeline.transforms
                if isinstance(op, v2.RandomApply) for t in op.transforms if isinstance(t, kind)]

    def solarise(pipeline):
        return [op.p for op in pipeline.transforms if isinstance(op, v2.RandomSolarize)]

    t = multi_crop_transform(224, 96, num_global=2, num_local=2, augment="byol")
    g1, g2, local = t.transforms[0], t.transforms[1], t.transforms[2]
    assert [p for p, _ in ops(g1, v2.GaussianBlur)] == [1.0] and solarise(g1) == []
    assert [p for p, _ in ops(g2, v2.GaussianBlur)] == [0.1] and solarise(g2) == [0.2]
    assert [p for p, _ in ops(local, v2.GaussianBlur)] == [0.5] and solarise(local) == []
    jitter = next(t for op in g1.transforms if isinstance(op, v2.RandomApply)
                  for t in op.transforms if isinstance(t, v2.ColorJitter))
    assert jitter.saturation == (0.8, 1.2)  # BYOL's 0.2, not SimCLR's 0.4
    simclr = multi_crop_transform(224, 96, num_global=2, num_local=0)
    assert all(solarise(p) == [] for p in simclr.transforms)
    assert [p for p, _ in ops(simclr.transforms[1], v2.GaussianBlur)] == [0.5]
    views = multi_crop_transform(32, 16, 2, 2, augment="byol")(
        torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    with pytest.raises(ValueError, match="augment must be one of simclr, byol"):
        multi_crop_transform(32, 16, augment="dino")
