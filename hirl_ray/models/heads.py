"""Small composable MLP heads (projectors / predictors) shared by every SSL method."""

from __future__ import annotations

from torch import nn


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False,
    last_bias: bool | None = None,
) -> nn.Sequential:
    """``Linear-BN-ReLU`` × (num_layers − 1), then ``Linear`` (optionally followed by BN).

    This is the projector of SimCLR (Chen et al. 2020, Sec. 2.1, with BN as in SimCLR v2),
    the MoCo v2/v3 projector, the BYOL projector/predictor (Grill et al. 2020, Sec. 3.3) and,
    with ``num_layers=3, last_bn=True``, the SimSiam projector (Chen & He 2021, Sec. 4.4); with
    ``last_bn=True`` (ViT) or ``last_bias=False`` (ResNet) MoCo v3's ``_build_mlp`` heads, whose
    Linear layers have no bias at all (Chen, Xie & He 2021).

    Args:
        in_dim: Input feature size.
        hidden_dim: Width of every hidden layer.
        out_dim: Output size.
        num_layers: Number of ``Linear`` layers (≥ 1).
        last_bn: Append a non-affine ``BatchNorm1d`` after the last ``Linear``, as the
            SimSiam projector does; the output ``Linear`` then has no bias (BN removes it).
        last_bias: Whether the output ``Linear`` has a bias (``None``: when there is no last BN).

    Returns:
        The head as an ``nn.Sequential`` mapping ``(B, in_dim)`` to ``(B, out_dim)``.
    """
    if num_layers < 1:
        raise ValueError(f"mlp num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        # No bias before BN: BN's shift makes it redundant.
        layers += [
            nn.Linear(dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
        ]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn if last_bias is None else last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
