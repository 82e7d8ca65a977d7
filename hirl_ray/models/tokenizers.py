"""Visual tokenizers for BEiT's masked image modelling: image → one token id per ViT patch.

BEiT (Bao et al., ICLR 2022, Sec. 2.1) predicts, at masked positions, the ids that a frozen
image tokenizer assigns to the *unmasked* image: DALL-E's discrete VAE (8192 tokens, one per
8×8 pixels of a 112-px image, i.e. per 16-px patch of the 224-px view). Two tokenizers here:

* :class:`KMeansTokenizer` — a codebook the project trains itself: k-means (faiss) over the raw
  pixel patches (``patch_size² × 3`` values of the normalised view) of training images; a
  patch's token is its nearest codebook entry. No download, fits in a second on CPU.
* :class:`FileTokenizer` — a pre-trained tokenizer from a file (``torch.export`` or TorchScript)
  mapping RGB images in ``[0, 1]`` ``(B, 3, H, W)`` to logits ``(B, num_tokens, h, w)``
  (token = argmax over the logits, as the official ``DiscreteVAE.get_codebook_indices``). README
  "BEiT" shows how to export DALL-E's encoder to this format once, where it can be downloaded.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import faiss
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hirl_ray.data.transforms import MEAN, STD


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """``(B, 3, H, W)`` → ``(B, N, 3·p²)`` non-overlapping patches, row-major like the ViT grid."""
    cols = F.unfold(x, patch_size, stride=patch_size)  # (B, 3·p², N), channel-major per patch
    return cols.transpose(1, 2)


class KMeansTokenizer(nn.Module):
    """Token = nearest centre of a k-means codebook over pixel patches.

    The codebook and a ``fitted`` flag are buffers: they travel in checkpoints, so a resumed run
    keeps the codebook its network learnt to predict instead of refitting.

    Args:
        num_tokens: Codebook size ``K``.
        patch_size: Side of a patch in pixels (the ViT's).
    """

    def __init__(self, num_tokens: int, patch_size: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.patch_size = patch_size
        self.register_buffer("codebook", torch.zeros(num_tokens, 3 * patch_size ** 2))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._known_fitted = False  # host copy of a True flag: no device sync per step

    @property
    def is_fitted(self) -> bool:
        """Whether the codebook is fitted (reads the buffer until it is, then a host copy)."""
        if not self._known_fitted:
            self._known_fitted = bool(self.fitted)
        return self._known_fitted

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._known_fitted = False  # the loaded flag decides
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def fit(self, patches: Tensor, seed: int, niter: int = 20) -> None:
        """k-means (faiss, ``seed``, ``niter`` Lloyd iterations) of ``(M, 3·p²)`` patches.

        Deterministic for a seed and the same input (faiss's CPU k-means; its sums are split
        by centroid, not by thread). faiss itself subsamples to 256 points per centroid.
        """
        m = patches.shape[0]
        if m < self.num_tokens:
            raise ValueError(f"the kmeans tokenizer needs at least method.num_tokens "
                             f"({self.num_tokens}) patches to fit, got {m}; lower "
                             "method.num_tokens or raise train.batch_size")
        x = patches.detach().float().cpu().contiguous().numpy()
        km = faiss.Kmeans(x.shape[1], self.num_tokens, niter=niter, seed=seed, verbose=False)
        km.train(x)
        self.codebook.copy_(torch.from_numpy(km.centroids))
        self.fitted.fill_(True)

    @torch.no_grad()
    def ids(self, patches: Tensor) -> Tensor:
        """``(..., 3·p²)`` patches → ``(...)`` ids of their nearest codebook entries (L2)."""
        c = self.codebook.float()
        p = patches.float()
        # argmin ‖p − c‖² = argmax 2·p·c − ‖c‖² (‖p‖² is the same for every c).
        return (2 * p @ c.T - (c * c).sum(1)).argmax(-1)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` normalised views → ``(B, N)`` token ids of their patches."""
        if not self.is_fitted:
            raise RuntimeError("KMeansTokenizer used before fit()")
        with torch.autocast(x.device.type, enabled=False):
            return self.ids(patchify(x.float(), self.patch_size))


class FileTokenizer(nn.Module):
    """A pre-trained tokenizer file: ``[0, 1]`` RGB ``(B, 3, H, W)`` → logits ``(B, K, h, w)``.

    The file is a ``torch.export`` program (``torch.export.save``, batch dimension dynamic) or
    a TorchScript module (``torch.jit.save``); nothing else is needed to run it. The view
    (normalised with ImageNet statistics) is mapped back to ``[0, 1]`` and resized to
    ``grid · stride`` pixels per side (BEiT: the 224-px crop resized to 112 px for the dVAE,
    whose 8× downsampling gives ViT-B/16's 14×14 grid), as the official second, smaller image
    of the same crop. The network is frozen and kept out of the module tree: DDP and the
    optimiser never see it and checkpoints stay small (the file is reloaded on resume).

    Args:
        net: The loaded tokenizer network.
        num_tokens: Expected number of logit channels.
        stride: Input pixels per output token of ``net`` (DALL-E's encoder: 8).
    """

    def __init__(self, net: nn.Module, num_tokens: int, stride: int) -> None:
        super().__init__()
        for p in net.parameters():
            p.requires_grad_(False)
        self._net = [net]  # a list: not a submodule (see above)
        self._device = torch.device("cpu")
        self.num_tokens = num_tokens
        self.stride = stride

    @classmethod
    def load(cls, path: str, num_tokens: int, stride: int) -> FileTokenizer:
        """Load ``path`` (a local path or a remote URI, read through :mod:`hirl_ray.storage`)."""
        from hirl_ray import storage

        data = storage.read_bytes(path)
        try:
            names = zipfile.ZipFile(io.BytesIO(data)).namelist()
        except zipfile.BadZipFile:
            names = []
        if any(n.endswith("archive_format") for n in names):  # torch.export's .pt2 archive
            net = torch.export.load(io.BytesIO(data)).module()
        elif any(n.endswith("constants.pkl") for n in names):  # TorchScript
            net = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        else:
            raise ValueError(f"method.tokenizer_path: {path} is neither a torch.export program "
                             "nor a TorchScript module; export it as README \"BEiT\" shows")
        return cls(net, num_tokens, stride)

    @property
    def net(self) -> nn.Module:
        return self._net[0]

    @torch.no_grad()
    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """``(B, 3, H, W)`` normalised views → ``(B, grid_h·grid_w)`` token ids."""
        mean = x.new_tensor(MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(STD).view(1, 3, 1, 1)
        with torch.autocast(x.device.type, enabled=False):
            rgb = (x.float() * std + mean).clamp(0, 1)
            size = (grid[0] * self.stride, grid[1] * self.stride)
            if tuple(rgb.shape[-2:]) != size:
                rgb = F.interpolate(rgb, size=size, mode="bicubic", antialias=True,
                                    align_corners=False).clamp(0, 1)
            if self._device != rgb.device:
                self.net.to(rgb.device)
                self._device = rgb.device
            logits = self.net(rgb)
        if logits.shape[1] != self.num_tokens or tuple(logits.shape[-2:]) != grid:
            raise ValueError(f"method.tokenizer_path: the tokenizer returned logits of shape "
                             f"{tuple(logits.shape)} for {size[0]}-px images, expected "
                             f"(B, {self.num_tokens}, {grid[0]}, {grid[1]}); check "
                             "method.num_tokens and method.tokenizer_stride")
        return logits.argmax(1).flatten(1)
