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
