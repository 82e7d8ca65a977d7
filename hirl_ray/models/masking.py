"""Block-wise patch masks for masked image modelling (BEiT Alg. 1; iBOT's ``pred_shape: block``).

Pure functions of a patch grid and a ``torch.Generator``: a method draws its masks inside its
forward on the host (a mask depends only on the grid, not on the pixels), so the data loader
stays method-agnostic and a seeded run draws the same masks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def block_mask(grid_h: int, grid_w: int, num_masked: int, generator: torch.Generator | None = None,
               min_block: int = 4, min_aspect: float = 0.3, max_tries: int = 10) -> Tensor:
    """A ``(grid_h, grid_w)`` bool mask of about ``num_masked`` patches in rectangular blocks.

    BEiT's block-wise masking (Bao et al. 2022, Alg. 1): repeatedly draw a block of
    ``s`` ∈ [``min_block``, remaining] patches with aspect ratio ``r`` (log-uniform in
    [``min_aspect``, 1/``min_aspect``]) at a random position and mask its not-yet-masked
    patches, until ``num_masked`` are masked or no draw adds any (then the mask may hold fewer;
    it never holds more).

    Args:
        grid_h: Patch rows.
        grid_w: Patch columns.
        num_masked: Target number of masked patches, ``0 <= num_masked <= grid_h·grid_w``.
        generator: RNG (reproducible masks).
        min_block: Smallest block in patches (BEiT: 16 for a 14×14 grid; a quarter of that for
            small grids is the default here).
        min_aspect: Smallest aspect ratio (BEiT: 0.3).
        max_tries: Draws per block before giving up on adding to the mask.
    """
    total = grid_h * grid_w
    if not 0 <= num_masked <= total:
        raise ValueError(f"num_masked must be in [0, {total}], got {num_masked}")
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    count = 0
    while count < num_masked:
        remaining = num_masked - count
        added = 0
        for _ in range(max_tries):
            size = _uniform(min(min_block, remaining), remaining, generator)
            aspect = math.exp(_uniform(log_lo, log_hi, generator))
            h = int(round(math.sqrt(size * aspect)))
            w = int(round(math.sqrt(size / aspect)))
            if not (0 < h <= grid_h and 0 < w <= grid_w):
                continue
            top = int(torch.randint(0, grid_h - h + 1, (), generator=generator))
            left = int(torch.randint(0, grid_w - w + 1, (), generator=generator))
            block = mask[top:top + h, left:left + w]
            new = int((~block).sum())
            if 0 < new <= remaining:
                block.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def random_block_masks(batch: int, grid: int, ratio: tuple[float, float],
                       generator: torch.Generator | None = None, min_aspect: float = 0.3
                       ) -> Tensor:
    """``(batch, grid·grid)`` bool masks, each image's ratio drawn uniformly from ``ratio``.

    iBOT draws every image's mask ratio from ``pred_ratio ± pred_ratio_var`` (Zhou et al. 2022,
    Sec. 3.2: 0.1–0.5, with probability 0.5 per image); BEiT masks 40% (``ratio=(0.4, 0.4)``).
    A ratio of 0 gives an all-False row (the image is not masked).
    """
    lo, hi = ratio
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"mask ratio range must satisfy 0 <= min <= max <= 1, got {ratio}")
    n = grid * grid
    min_block = max(1, round(16 * n / 196))  # BEiT's 16 patches of a 14x14 grid, scaled
    masks = [block_mask(grid, grid, round(_uniform(lo, hi, generator) * n), generator,
                        min_block=min_block, min_aspect=min_aspect) for _ in range(batch)]
    return torch.stack(masks).view(batch, n)


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor (a mask drawn on the host) on ``device`` without a host sync.

    A plain ``.to("cuda")`` from pageable memory makes the host wait for the copy; from pinned
    memory with ``non_blocking`` it is queued like a kernel (the caching host allocator keeps
    the pinned buffer alive until the copy ran). On the CPU it is ``.to(device)``.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
