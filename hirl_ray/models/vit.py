"""Vision Transformers on torchvision's blocks: any resolution, patch tokens, masking, drop path.

torchvision's ``VisionTransformer`` only returns the classifier output of one fixed image size.
The SSL methods of the paper need more of it: DINO's local crops are smaller than the global
ones (the position embedding is interpolated, Caron et al. 2021, ``interpolate_pos_encoding``;
solo-learn #154), iBOT and BEiT replace masked patches with a learnt ``[MASK]`` token and read
every output token, and the paper's ViT-B/16 recipes use stochastic depth (drop path 0.1).
:class:`ViT` runs torchvision's modules (patch embedding, class token, position embedding,
encoder blocks, final LayerNorm) in that order with those additions; torchvision builds and
initialises them, so ``vit_b_16`` is torchvision's ViT-B/16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer
from torchvision.ops import stochastic_depth

from hirl_ray.config import ConfigError, ModelConfig


class ViT(nn.Module):
    """A torchvision ViT as an SSL backbone: ``forward`` gives the ``[CLS]`` output.

    ``forward(x)`` → ``(B, D)`` final-LayerNorm ``[CLS]`` token (the DINO/MoCo v3/iBOT
    feature, HIRL's ``vit_cls``); :meth:`tokens` → ``(B, 1 + N, D)`` every output token, with
    optional masking. Images of any side divisible by the patch size are accepted: the position
    embedding of the patch grid is bicubically resized to the input's grid.

    Args:
        net: A torchvision ``VisionTransformer`` (its classifier head is dropped).
        drop_path: Stochastic-depth rate of the last block, rising linearly from 0 in the
            first (Huang et al. 2016; DeiT/DINO/BEiT: 0.1 for ViT-B).
    """

    def __init__(self, net: VisionTransformer, drop_path: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(f"model.drop_path must be in [0, 1), got {drop_path}")
        self.patch_size = net.patch_size
        self.embed_dim = net.hidden_dim
        self.grid = net.image_size // net.patch_size  # side of the grid pos_embedding was built for
        self.conv_proj = net.conv_proj
        self.class_token = net.class_token
        self.pos_embedding = net.encoder.pos_embedding
        self.dropout = net.encoder.dropout
        self.blocks = nn.ModuleList(net.encoder.layers)
        self.norm = net.encoder.ln
        depth = len(self.blocks)
        self.drop_path = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        self.mask_token: nn.Parameter | None = None

    def enable_masking(self) -> None:
        """Add the learnt ``[MASK]`` embedding (iBOT, BEiT); only masking methods train it.

        Kept out of methods that never mask: an unused trainable parameter gets no gradient and
        DDP (``find_unused_parameters=False``) fails on it.
        """
        if self.mask_token is None:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def grid_size(self, image_size: int) -> int:
        """Patches per side at ``image_size`` (an error when it is not a multiple of the patch)."""
        if image_size % self.patch_size:
            raise ValueError(f"image side {image_size} is not a multiple of the ViT patch size "
                             f"{self.patch_size}; choose crop sizes divisible by it")
        return image_size // self.patch_size

    def _pos_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        pos = self.pos_embedding
        if (grid_h, grid_w) == (self.grid, self.grid):
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic",
                                  align_corners=False).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def _block(self, i: int, block: EncoderBlock, x: Tensor) -> Tensor:
        # torchvision's EncoderBlock.forward with stochastic depth on both residual branches.
        p = self.drop_path[i] if self.training else 0.0
        y = block.ln_1(x)
        y, _ = block.self_attention(y, y, y, need_weights=False)
        x = x + stochastic_depth(block.dropout(y), p, "row", self.training)
        return x + stochastic_depth(block.mlp(block.ln_2(x)), p, "row", self.training)

    def tokens(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Every output token, ``(B, 1 + N, D)``: ``[CLS]`` first, then the patches row-major.

        Args:
            x: ``(B, 3, H, W)`` images, ``H`` and ``W`` multiples of the patch size.
            mask: Optional ``(B, N)`` bool, ``True`` where a patch embedding is replaced by the
                ``[MASK]`` token (before the position embedding is added, as in BEiT/iBOT);
                needs :meth:`enable_masking`.
        """
        b = x.shape[0]
        gh, gw = self.grid_size(x.shape[-2]), self.grid_size(x.shape[-1])
        t = self.conv_proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if mask is not None:
            if self.mask_token is None:
                raise RuntimeError("ViT.tokens got a mask but masking is off; the method must "
                                   "call backbone.enable_masking() when it is built")
            w = mask.to(t.dtype).unsqueeze(-1)
            t = t * (1 - w) + self.mask_token.to(t.dtype) * w
        t = torch.cat([self.class_token.expand(b, -1, -1), t], dim=1)
        t = self.dropout(t + self._pos_embedding(gh, gw))
        for i, block in enumerate(self.blocks):
            t = self._block(i, block, t)
        return self.norm(t)

    def forward(self, x: Tensor) -> Tensor:
        """The ``[CLS]`` output ``(B, D)``."""
        return self.tokens(x)[:, 0]


def auto_patch_size(image_size: int) -> int:
    """The small ViT's default patch: an 8×8 grid (4 px at 32 px, 8 at 64, 12 at 96), ≥ 2."""
    return max(2, image_size // 8)


def vit_patch_size(cfg: ModelConfig, image_size: int) -> int:
    """The patch side in pixels the ViT of ``cfg`` gets at ``image_size``.

    ``model.patch_size`` when set, else the builders' default: 16 for ``vit_b_16``,
    :func:`auto_patch_size` for ``vit_tiny``. For config checks that need the patch grid
    before a network exists (crop sizes, tokens per batch).
    """
    if cfg.patch_size:
        return cfg.patch_size
    return 16 if cfg.backbone == "vit_b_16" else auto_patch_size(image_size)


def vit_tiny(image_size: int, patch_size: int | None = None, drop_path: float = 0.0) -> ViT:
    """A ViT for 32–96 px images: width 192, 6 blocks, 3 heads (DeiT-Tiny's width, half depth).

    An 8×8 grid of patches by default, so 32-px CPU runs see 64 tokens; 6 blocks rather than
    DeiT-Tiny's 12 keep a CPU step in the range of the small CNN's.
    """
    patch = patch_size or auto_patch_size(image_size)
    if image_size % patch:
        raise ConfigError(f"model.patch_size ({patch}) must divide data.image_size "
                          f"({image_size}) for a ViT")
    net = VisionTransformer(image_size=image_size, patch_size=patch, num_layers=6, num_heads=3,
                            hidden_dim=192, mlp_dim=768)
    return ViT(net, drop_path)


def vit_b_16(image_size: int, drop_path: float = 0.0) -> ViT:
    """torchvision's ViT-B/16 (86M parameters, width 768), never with downloaded weights.

    Built for ``image_size`` (224 in the paper) so the position embedding matches the global
    crops; other crop sizes are interpolated.
    """
    if image_size % 16:
        raise ConfigError(f"data.image_size ({image_size}) must be a multiple of 16 for vit_b_16")
    net = torchvision.models.vit_b_16(weights=None, image_size=image_size)
    return ViT(net, drop_path)
