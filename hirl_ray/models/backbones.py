"""Backbones: ``(B, 3, H, W)`` images → ``(B, feat_dim)`` features.

CNNs give globally pooled features; ViTs (``vit_*``, :mod:`hirl_ray.models.vit`) the ``[CLS]``
output and, through ``tokens()``, every patch token.
"""

from __future__ import annotations

import torchvision
from torch import Tensor, nn

from hirl_ray.config import BACKBONES, ConfigError, ModelConfig
from hirl_ray.models.vit import vit_b_16, vit_tiny


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(nn.Module):
    """A four-conv VGG-style CNN for fast CPU runs on ~32×32 images.

    ``width`` is the channel count of the second stage; the stages have
    ``(width/2, width, 2·width, 4·width)`` channels, each one ``conv3x3-BN-ReLU``, the last
    three with stride 2, then global average pooling, so ``feat_dim = 4·width``
    (256 at the default width 64). One conv per stage rather than two keeps forward+backward
    above ~1,000 img/s on one CPU thread at 32×32 (two per stage halved that), which the
    minutes-long CPU demos need. Inputs larger than 64 px get a stride-2 stem so the cost
    stays bounded.

    Args:
        width: Channel multiplier (``model.width``), ≥ 2.
        image_size: Input side length; only decides the stem stride.
    """

    def __init__(self, width: int = 64, image_size: int = 32) -> None:
        super().__init__()
        if width < 2:
            raise ConfigError(f"model.width must be >= 2 for small_cnn, got {width}")
        chans = (width // 2, width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        in_ch = 3
        for i, ch in enumerate(chans):
            stride = (1 if image_size <= 64 else 2) if i == 0 else 2
            layers += _conv_bn_relu(in_ch, ch, stride)
            in_ch = ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = chans[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # Same init as torchvision ResNets, so the two backbone families train alike.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, feat_dim)``."""
        return self.pool(self.features(x)).flatten(1)


def _resnet(name: str, small_stem: bool) -> tuple[nn.Module, int]:
    net = getattr(torchvision.models, name)(weights=None)  # never downloads weights
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    if small_stem:
        # CIFAR-style stem (SimCLR, Appendix B.9): a 7×7/2 conv plus max-pool would shrink a
        # 32×32 image to 8×8 before the first block and lose most spatial detail.
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net, feat_dim


def _small_cnn(cfg: ModelConfig, image_size: int) -> tuple[nn.Module, int]:
    net = SmallCNN(cfg.width, image_size)
    return net, net.feat_dim


def register_backbone(name: str, builder) -> None:
    """Make ``model.backbone: <name>`` build ``builder(model_cfg, image_size) -> (module, dim)``."""
    BACKBONES.register(name, builder)


def _vit_tiny(cfg: ModelConfig, image_size: int) -> tuple[nn.Module, int]:
    net = vit_tiny(image_size, cfg.patch_size, cfg.drop_path)
    return net, net.embed_dim


def _vit_b_16(cfg: ModelConfig, image_size: int) -> tuple[nn.Module, int]:
    if cfg.patch_size not in (None, 16):
        raise ConfigError(f"model.patch_size must be 16 or null for vit_b_16, got {cfg.patch_size}")
    net = vit_b_16(image_size, cfg.drop_path)
    return net, net.embed_dim


register_backbone("small_cnn", _small_cnn)
register_backbone("vit_tiny", _vit_tiny)
register_backbone("vit_b_16", _vit_b_16)
for _name in ("resnet18", "resnet50"):
    register_backbone(_name, lambda cfg, size, _n=_name: _resnet(_n, cfg.small_stem or size <= 64))


def build_backbone(cfg: ModelConfig, image_size: int) -> tuple[nn.Module, int]:
    """Build the backbone named by ``cfg.backbone`` (one of ``BACKBONES``).

    Args:
        cfg: Model section; ``small_stem`` (or ``image_size <= 64``) gives ResNets a 3×3/1
            stem without max-pool.
        image_size: Input side length in pixels.

    Returns:
        ``(module, feat_dim)``: the module maps ``(B, 3, H, W)`` to ``(B, feat_dim)``.
    """
    return BACKBONES.get(cfg.backbone)(cfg, image_size)
