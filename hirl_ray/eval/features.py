"""Frozen-feature extraction for evaluation: embed a loader, keep results on CPU, dedupe.

Features are moved to CPU batch by batch because online kNN that kept the feature bank on
the GPU grew GPU memory epoch after epoch (solo-learn #186, #159). Evaluation must run with
BatchNorm in eval mode (lightly #1444); :func:`eval_mode` does that and restores the
previous flags afterwards, so calling evaluation mid-training does not silently leave the
model in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the duration of the block.

    Every submodule's own ``training`` flag is restored on exit (not just the root's), so
    a model that deliberately kept, e.g., a frozen BatchNorm in eval mode stays that way.

    Args:
        module: The module to switch; it is yielded back.
    """
    previous = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in previous:
            m.training = flag


@torch.no_grad()
def extract_features(
    embed: Callable[[Tensor], Tensor],
    loader: Iterable,
    device: torch.device | str = "cpu",
    normalize: bool = True,
    amp: bool = False,
) -> tuple[Tensor, Tensor]:
    """Embed every batch of ``loader`` and collect the results on CPU.

    The caller is responsible for eval mode (wrap the call in :func:`eval_mode`): a
    BatchNorm left in training mode makes features depend on batch composition.

    Args:
        embed: Maps an image batch ``(B, ...)`` on ``device`` to features ``(B, D)``.
        loader: Yields ``(images, index)`` batches (extra trailing items are ignored);
            ``index`` holds dataset indices.
        device: Where ``embed`` runs.
        normalize: L2-normalise each feature row (cosine kNN / spherical k-means).
        amp: Run ``embed`` under ``torch.autocast`` for ``device``'s type.

    Returns:
        ``(features, indices)``: float32 ``(N_seen, D)`` and int64 ``(N_seen,)`` on CPU, in
        the order seen. ``N_seen`` counts sampler padding duplicates; see
        :func:`dedup_by_index`. An empty loader gives ``(0, 0)`` and ``(0,)`` tensors.
    """
    device = torch.device(device)
    feats: list[Tensor] = []
    idxs: list[Tensor] = []
    for batch in loader:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError(
                "extract_features: loader must yield (images, index) batches; "
                "wrap the dataset so items are (image, dataset_index)"
            )
        images, index = batch[0], batch[1]
        with torch.autocast(device_type=device.type, enabled=amp):
            out = embed(images.to(device, non_blocking=True))
        out = out.float()
        if out.ndim != 2:
            out = out.flatten(1)
        if normalize:
            out = F.normalize(out, dim=1)
        feats.append(out.cpu())
        idxs.append(torch.as_tensor(index).reshape(-1).to(torch.int64).cpu())
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(idxs)


def dedup_by_index(features: Tensor, indices: Tensor, num_samples: int) -> tuple[Tensor, Tensor]:
    """Scatter features into dataset order, dropping duplicates by dataset index.

    ``DistributedSampler`` pads the last shard by repeating indices. The official HIRL code
    undoes the resulting double counting by halving rows whose norm exceeds 1.5 after a sum
    all-reduce; that breaks for unnormalised features and for more than one repeat. We
    de-duplicate by index instead: the first occurrence of each index wins.

    Args:
        features: ``(M, D)`` features in the order seen (possibly from several shards).
        indices: ``(M,)`` dataset index of every row, each in ``[0, num_samples)``.
        num_samples: Dataset size.

    Returns:
        ``(out, present)``: ``out`` is ``(num_samples, D)`` with row ``i`` the feature of
        sample ``i`` (zeros where never seen), ``present`` is the ``(num_samples,)`` bool mask
        of rows that were seen.
    """
    indices = torch.as_tensor(indices, dtype=torch.int64, device=features.device).reshape(-1)
    if indices.numel() != features.shape[0]:
        raise ValueError(
            f"dedup_by_index: got {features.shape[0]} feature rows but {indices.numel()} "
            "indices; pass one dataset index per row"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_samples):
        raise ValueError(
            f"dedup_by_index: indices must lie in [0, {num_samples}), got range "
            f"[{int(indices.min())}, {int(indices.max())}]; pass the full dataset size"
        )
    dim = features.shape[1] if features.ndim == 2 else 0
    out = features.new_zeros((num_samples, dim))
    rows = torch.arange(indices.numel(), device=features.device)
    # Row of the first occurrence of each index (deterministic, unlike a plain scatter
    # with duplicate targets, whose winner is unspecified).
    first = torch.full((num_samples,), indices.numel(), dtype=torch.int64, device=features.device)
    first.scatter_reduce_(0, indices, rows, reduce="amin")
    present = first < indices.numel()
    out[present] = features[first[present]]
    return out, present
