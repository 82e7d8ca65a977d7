"""BEiT (Bao et al., ICLR 2022): masked image modelling on visual tokens, ViT backbone."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from hirl_ray.config import ConfigError, check_choice, check_positive
from hirl_ray.data.transforms import MEAN, STD, MultiViewTransform
from hirl_ray.losses.beit import masked_token_loss
from hirl_ray.methods.base import (
    MethodOutput,
    ProjectorConfig,
    SSLMethod,
    register_method,
    split_weight_decay,
)
from hirl_ray.methods.distributed import (
    all_reduce_sum,
    broadcast_buffers,
    gather_no_grad,
    rank,
    world_size,
)
from hirl_ray.models.heads import mlp
from hirl_ray.models.masking import host_to_device, random_block_masks
from hirl_ray.models.tokenizers import FileTokenizer, KMeansTokenizer, patchify
from hirl_ray.models.vit import vit_patch_size

if TYPE_CHECKING:
    from hirl_ray.config import DataConfig, ExperimentConfig

TOKENIZERS = ("kmeans", "dvae")


@dataclass(frozen=True)
class BEiTConfig(ProjectorConfig):
    """``method:`` keys of BEiT (see README "BEiT" for the tokenizers)."""

    name: str = "beit"
    # 0: no projector, the MIM head and HIRL read the ViT tokens (official HIRL-BEiT, beit_base);
    # >= 1: an MLP (proj_dim out, hidden_dim wide) on every token before the MIM head
    # (official beit_base_with_proj: 2), whose [CLS]/patch-mean outputs HIRL reads.
    proj_layers: int = 0
    num_tokens: int = 256           # visual-token vocabulary (DALL-E's dVAE: 8192)
    tokenizer: str = "kmeans"       # kmeans: fitted on the first batch; dvae: tokenizer_path
    tokenizer_path: str = ""        # dvae: torch.export/TorchScript file (path or s3://), README
    tokenizer_stride: int = 8       # dvae: input pixels per token (DALL-E: 8, 112 px -> 14x14)
    mask_ratio: float = 0.4         # fraction of patches masked, in blocks (BEiT: 40%)
    kmeans_iters: int = 20          # kmeans: Lloyd iterations of the codebook fit
    kmeans_seed: int = 0            # kmeans: seed of the codebook fit (same on every rank)
    shape_keys = ("proj_dim", "hidden_dim", "proj_layers", "num_tokens", "tokenizer")

    def __post_init__(self) -> None:
        # Relative local paths are made absolute on the driver (workers run elsewhere), as
        # data.root.
        p = self.tokenizer_path
        if p and "://" not in p and not p.startswith("~") and not os.path.isabs(p):
            object.__setattr__(self, "tokenizer_path", os.path.abspath(p))

    def check(self, where: str) -> None:
        super().check(where)
        check_positive(self, where, "num_tokens", "tokenizer_stride", "kmeans_iters")
        check_positive(self, where, "proj_layers", strict=False)
        check_choice(f"{where}.tokenizer", self.tokenizer, TOKENIZERS)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"{where}.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.tokenizer != "dvae":
            return
        path = self.tokenizer_path
        if not path:
            raise ConfigError(f"{where}.tokenizer_path is required with {where}.tokenizer=dvae; "
                              "export the dVAE encoder as README \"BEiT\" shows")
        if "://" not in path and not os.path.isfile(os.path.expanduser(path)):
            raise ConfigError(f"{where}.tokenizer_path: file {path} not found; export the dVAE "
                              "encoder (README \"BEiT\") and give its path")

    def check_experiment(self, cfg: ExperimentConfig) -> None:
        """The kmeans tokenizer fits on the first global batch: it must hold num_tokens patches."""
        if self.tokenizer != "kmeans":
            return
        size = cfg.data.image_size
        patch = vit_patch_size(cfg.model, size)
        patches = cfg.train.batch_size * (size // patch) ** 2
        if self.num_tokens > patches:
            raise ConfigError(f"method.num_tokens ({self.num_tokens}) exceeds the {patches} "
                              "patches of the first batch the kmeans tokenizer fits on; lower it "
                              "or raise train.batch_size")


def beit_view(image_size: int) -> v2.Compose:
    """BEiT's one view: colour jitter (0.4, 0.4, 0.4), flip, random resized crop (0.08–1).

    Official ``DataAugmentationBEiT`` (jitter always applied); the dVAE's smaller image of the
    same crop is made from this view in :class:`~hirl_ray.models.tokenizers.FileTokenizer`.
    """
    return v2.Compose([
        v2.ColorJitter(0.4, 0.4, 0.4),
        v2.RandomHorizontalFlip(),
        v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


@register_method
class BEiT(SSLMethod):
    """BEiT: predict the visual tokens of masked patches from the masked image (BEiT Eq. 1).

    Each view (BEiT's transform gives one; more are treated as more images) gets a block-wise
    mask (BEiT Alg. 1, ``mask_ratio``); the ViT replaces masked patch embeddings by ``[MASK]``;
    a linear head maps each masked output token (after the optional projector) to
    ``num_tokens`` logits; cross-entropy against the tokenizer's ids of the unmasked view.
    HIRL reads the projector outputs of ``views[0]``'s masked pass (official hook): the
    ``[CLS]`` token (``projection``/``vit_cls``) or the patch mean (``vit_mean``).

    Distributed: the loss is divided by the global number of masked patches over the ranks
    (all-reduced), so DDP's gradient is that of one worker with the global batch. The kmeans
    codebook is fitted in the first training forward (buffer ``tokenizer.fitted`` unset) on
    the patches of every rank (gathered), by rank 0, and broadcast; it sits in checkpoints,
    so a resumed run does not refit.
    """

    name: ClassVar[str] = "beit"
    Config = BEiTConfig
    embeddings: ClassVar[tuple[str, ...]] = ("projection", "backbone", "vit_cls", "vit_mean")
    needs_vit: ClassVar[bool] = True

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: BEiTConfig) -> None:
        super().__init__(backbone, feat_dim, cfg)
        backbone.enable_masking()
        self.projector: nn.Module = (
            mlp(feat_dim, cfg.hidden_dim, cfg.proj_dim, num_layers=cfg.proj_layers)
            if cfg.proj_layers else nn.Identity())
        self.head = nn.Linear(self.embedding_dim("projection"), cfg.num_tokens)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.tokenizer: nn.Module
        if cfg.tokenizer == "dvae":
            self.tokenizer = FileTokenizer.load(cfg.tokenizer_path, cfg.num_tokens,
                                                       cfg.tokenizer_stride)
        else:
            self.tokenizer = KMeansTokenizer(cfg.num_tokens, backbone.patch_size)

    def transform(self, data_cfg: DataConfig) -> MultiViewTransform:
        """One BEiT view per image at ``data.image_size``."""
        return MultiViewTransform([beit_view(data_cfg.image_size)])

    def embedding_dim(self, embedding: str) -> int:
        """Without a projector the projection is the ViT token itself (``feat_dim``)."""
        return super().embedding_dim(embedding) if self.cfg.proj_layers else self.feat_dim

    def draw_masks(self, batch: int, grid: int) -> Tensor:
        """``(batch, grid²)`` block-wise masks (host RNG; each rank draws its own)."""
        r = self.cfg.mask_ratio
        return random_block_masks(batch, grid, (r, r))

    @torch.no_grad()
    def fit_tokenizer(self, views: list[Tensor]) -> None:
        """Fit the kmeans codebook on the patches of ``views`` (of every rank, in training).

        The points are ordered view by view, then image by image over the ranks, as one worker
        with the global batch would order them, so the fit does not depend on the worker count.
        """
        p = self.backbone.patch_size
        patches = torch.stack([patchify(v.float(), p) for v in views], 1)  # (B, V, N, 3p²)
        distributed = self.training and world_size() > 1
        # faiss keeps at most 256 points per centre: gather no more images than that needs.
        per_image = patches.shape[1] * patches.shape[2]
        keep = math.ceil(256 * self.cfg.num_tokens / (world_size() * per_image))
        patches = patches[:keep]
        if distributed:
            patches = gather_no_grad(patches)
        points = patches.transpose(0, 1).reshape(-1, patches.shape[-1])
        if not distributed or rank() == 0:
            self.tokenizer.fit(points, self.cfg.kmeans_seed, self.cfg.kmeans_iters)
        if distributed:  # rank 0's codebook everywhere (identical even across CPU types)
            broadcast_buffers(self.tokenizer)

    def forward(self, views: list[Tensor]) -> MethodOutput:
        """Masked-token cross-entropy over every view; HIRL embeddings of ``views[0]``."""
        if not views or len({tuple(v.shape[1:]) for v in views}) != 1:
            raise ValueError("beit expects >= 1 views of one size per image; its "
                             "transform(data_cfg) returns one view pipeline")
        b = views[0].shape[0]
        x = torch.cat(views) if len(views) > 1 else views[0]
        grid = self.backbone.grid_size(x.shape[-1])
        if x.shape[-2] != x.shape[-1]:
            raise ValueError(f"beit expects square views, got {tuple(x.shape[-2:])}")
        if isinstance(self.tokenizer, KMeansTokenizer):
            if not self.tokenizer.is_fitted:
                self.fit_tokenizer(views)
            ids = self.tokenizer(x)
        else:
            ids = self.tokenizer(x, (grid, grid))
        host_mask = self.draw_masks(x.shape[0], grid)
        # The masked positions are known on the host: gathering them with index_select keeps
        # the GPU's queue full (a boolean index, z[mask], makes the host wait for a count).
        where = host_to_device(host_mask.flatten().nonzero().squeeze(1), x.device)
        mask = host_to_device(host_mask, x.device)
        tokens = self.backbone.tokens(x, mask)  # (B', 1 + N, D)
        z = self.projector(tokens.flatten(0, 1)).view(*tokens.shape[:2], -1)  # token-wise
        logits = self.head(z[:, 1:].flatten(0, 1).index_select(0, where))
        count = torch.full((), float(where.shape[0]), device=x.device)
        if self.training and world_size() > 1:  # global |M| over ranks, see the docstring
            count = all_reduce_sum(count) / world_size()
        loss = masked_token_loss(logits, ids.flatten().index_select(0, where),
                                 count.clamp_min(1.0))
        return MethodOutput(loss=loss, embedding=tokens[:b, 0], projection=z[:b, 0],
                            projection_mean=z[:b, 1:].mean(1))

    def param_groups(self) -> list[dict[str, Any]]:
        """Weights with weight decay; biases, norms, ``[CLS]`` and position embedding without.

        As official BEiT (``get_params_groups`` with the ViT's ``no_weight_decay``:
        ``pos_embed``, ``cls_token``); the ``[MASK]`` token keeps weight decay there too.
        """
        skip = {"backbone.class_token", "backbone.pos_embedding"}
        params = dict(self.named_parameters())
        groups = split_weight_decay((n, p) for n, p in params.items() if n not in skip)
        extra = [params[n] for n in sorted(skip) if n in params and params[n].requires_grad]
        groups[-1]["params"] = groups[-1]["params"] + extra  # the no-decay group comes last
        return groups

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        """The online ViT and projector (official ``forward_feature``: projector([CLS]))."""
        return self.backbone, self.projector
