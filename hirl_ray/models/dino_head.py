"""DINO's projection head (Caron et al., ICCV 2021, Sec. 3.1 and App.): MLP → bottleneck → L2
norm → weight-normalised linear layer to ``out_dim`` prototypes. iBOT shares it (one head for
the ``[CLS]`` and the patch tokens, ``shared_head: True``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """``y = x Wᵀ`` with ``W = g · V / ‖V‖`` row-wise, no bias (Salimans & Kingma 2016).

    DINO's last layer (``nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))``
    with ``g`` filled with 1). ``trainable_g=False`` is DINO's ``norm_last_layer``: ``g``
    stays 1, so every prototype has unit norm, which the DINO authors found stabilises
    training. Written out rather than ``nn.utils.weight_norm`` (deprecated, and its
    pre-forward hook does not survive ``copy.deepcopy`` into the teacher cleanly); the
    parameters keep the official names ``weight_g`` and ``weight_v``.
    """

    def __init__(self, in_dim: int, out_dim: int, trainable_g: bool = False) -> None:
        super().__init__()
        # V starts as nn.Linear's default init, as in DINO (its trunc-normal init of the MLP
        # runs before the last layer is built).
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=trainable_g)

    def forward(self, x: Tensor) -> Tensor:
        """``(…, in_dim)`` → ``(…, out_dim)``."""
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, w)


class DINOHead(nn.Module):
    """``mlp`` (Linear-GELU × (layers − 1), Linear to the bottleneck) → L2 norm → ``last_layer``.

    No normalisation layers in the MLP (official ``norm_in_head: null``). ``mlp``'s output is
    the bottleneck embedding HIRL reads (official ``inst_cls_emb`` hook on ``head.mlp``) and
    clusters (teacher ``head.mlp``, official ``forward_feature``).

    Args:
        in_dim: Backbone feature size.
        out_dim: Number of prototypes ``K`` (the paper's ViT-B recipe: 65536).
        hidden_dim: MLP hidden width (2048).
        bottleneck_dim: Bottleneck width (256).
        num_layers: Linear layers of the MLP (3).
        norm_last_layer: Keep the last layer's weight-norm scale ``g`` at 1 (not trained).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3,
                 norm_last_layer: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, trainable_g=not norm_last_layer)

    def prototypes(self, z: Tensor) -> Tensor:
        """Logits over the ``out_dim`` prototypes of bottleneck embeddings ``z``."""
        return self.last_layer(F.normalize(z, dim=-1))

    def forward(self, x: Tensor) -> Tensor:
        """``(…, in_dim)`` → ``(…, out_dim)`` logits."""
        return self.prototypes(self.mlp(x))
