"""Linear probe: a multinomial logistic-regression classifier on frozen, cached features.

The standard linear evaluation of self-supervised representations (Zhang et al., ECCV 2016;
Kolesnikov et al., CVPR 2019; MoCo, He et al., CVPR 2020, Sec. 4.1; HIRL, Xu et al., NeurIPS
2022, Sec. 4.1): the encoder is frozen, its features are extracted once (``EvalInputs`` caches
them, L2-normalised) and a linear layer ``softmax(W x + b)`` is trained on the train split.

The learning rate and weight decay are picked, as in SimCLR's linear evaluation (Chen et al.,
ICML 2020, Appendix B), on a validation split carved from the **train** features (seeded,
stratified per class; :func:`stratified_split`); the chosen pair is then retrained on all train
features and scored once on the test split. The sweep (:func:`select_hyperparameters`) only
ever receives train features, so the test split cannot influence the choice.

Training is SGD with momentum and a cosine learning-rate decay (DINO ``eval_linear.py``),
mini-batch or full-batch, on CPU or GPU (``inputs.device``). Each dimension is first
standardised with the statistics of the rows being trained on (MAE, He et al., CVPR 2022,
App. A.2: BatchNorm without affine parameters before the probe); without it, plain SGD on
unit-norm backbone features stayed 10+ points below scikit-learn's L-BFGS logistic regression
on the same features, with it the two agree. The affine map is folded into ``W, b``, so the
classifier is still linear in the L2-normalised features. All ``lr × weight_decay`` pairs
of the sweep train at once as one batched ``(G, D, C)`` weight tensor on the same mini-batches
(the loss is a sum over pairs, so their gradients do not interact); the gradient of the mean
cross-entropy is written out (``x^T (softmax - onehot) / B``), no autograd.

Metrics per label level: ``linear_top1/<level>`` and, when the level has more than 5 classes,
``linear_top5/<level>`` (with ``C <= 5`` classes top-5 accuracy is 1.0 by construction, so it
is left out rather than reported as a constant). Test samples whose class never occurs in the
train split count as wrong.

Pure PyTorch / numpy; nothing here imports ``ray``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hirl_ray.config import ConfigError, check_positive
from hirl_ray.eval.protocol import EvalInputs, EvalProtocol, register_protocol
from hirl_ray.logs import get_logger

log = get_logger(__name__)

TOP_K = 5


@dataclass(frozen=True)
class LinearConfig:
    """``eval.params.linear``: the probe's training and its ``lr × weight_decay`` sweep.

    Attributes:
        epochs: Passes over the features, for every sweep pair and for the final retraining.
        lrs: Peak learning rates tried (cosine-decayed to 0 over training). Features are unit
            norm, so logits grow by about ``lr`` per step; 0.1 … 10 covers slow to fast.
        weight_decays: L2 penalties on ``W`` tried (the bias is not decayed).
        val_fraction: Share of each class of the train split held out to pick the pair.
        batch_size: Mini-batch size; ``0`` trains full-batch.
        momentum: SGD momentum.
    """

    epochs: int = 100
    lrs: tuple[float, ...] = (0.1, 1.0, 10.0)
    weight_decays: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3)
    val_fraction: float = 0.2
    batch_size: int = 256
    momentum: float = 0.9

    def check(self, where: str) -> None:
        check_positive(self, where, "epochs")
        check_positive(self, where, "batch_size", strict=False)
        if not self.lrs or min(self.lrs) <= 0:
            raise ConfigError(f"{where}.lrs must be a non-empty list of numbers > 0, "
                              f"got {list(self.lrs)}")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ConfigError(f"{where}.weight_decays must be a non-empty list of numbers >= 0, "
                              f"got {list(self.weight_decays)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{where}.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{where}.momentum must be in [0, 1), got {self.momentum}")


def stratified_split(labels: np.ndarray, val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, per-class split of ``range(len(labels))`` into (fit, validation) indices.

    Each class with ``n >= 2`` samples sends ``round(val_fraction * n)`` of them, at least 1
    and at most ``n - 1``, to validation; a class with one sample stays in the fit part.

    Args:
        labels: ``(N,)`` integer labels of the samples to split (the train split only).
        val_fraction: Share of each class held out, in ``(0, 1)``.
        seed: Seed of the per-class shuffles.

    Returns:
        Sorted int64 index arrays ``(fit, val)``, disjoint, together ``range(N)``.
    """
    y = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_val = min(max(round(val_fraction * idx.size), 1), idx.size - 1)
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    empty = np.empty(0, dtype=np.int64)
    return (np.sort(np.concatenate(fit or [empty])).astype(np.int64),
            np.sort(np.concatenate(val or [empty])).astype(np.int64))


def train_linear(x: Tensor, y: Tensor, num_classes: int, lrs: Sequence[float],
                 weight_decays: Sequence[float], epochs: int, batch_size: int = 256,
                 momentum: float = 0.9, seed: int = 0,
                 device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Train ``G = len(lrs)`` softmax classifiers at once, pair ``g`` with ``lrs[g]``,
    ``weight_decays[g]``, on the same seeded mini-batches.

    Minimises the mean cross-entropy ``-log softmax(x W_g + b_g)_y`` plus
    ``wd_g / 2 * ||W_g||^2`` by SGD with momentum, learning rate ``lr_g * (1 + cos(pi t/T)) / 2``
    at step ``t`` of ``T``; ``W`` and ``b`` start at zero (the problem is convex, so no random
    initialisation is needed and the result depends on ``seed`` only via batch order).
    ``x`` is standardised per dimension with its own mean and standard deviation (scaled by
    ``sqrt(D)`` to unit mean squared row norm) during training; ``W, b`` are returned for the
    raw ``x``.

    Args:
        x: ``(N, D)`` features.
        y: ``(N,)`` labels in ``[0, num_classes)``.
        num_classes: Output width ``C``.
        lrs, weight_decays: Equal-length per-classifier values.
        epochs: Passes over ``x``.
        batch_size: Mini-batch size; ``0`` (or ``>= N``) is full-batch.
        momentum: SGD momentum.
        seed: Seed of the batch order.
        device: Where the training runs.

    Returns:
        ``W (G, D, C)`` and ``b (G, C)``, float32 on ``device``.
    """
    if len(lrs) != len(weight_decays) or not lrs:
        raise ValueError(f"train_linear: need equal, non-empty lrs and weight_decays, got "
                         f"{len(lrs)} and {len(weight_decays)}")
    x = x.to(device=device, dtype=torch.float32)
    y = y.to(device=device, dtype=torch.int64)
    n, d = x.shape
    g = len(lrs)
    # Standardise each dimension with the training rows' statistics (MAE's BatchNorm without
    # affine before the probe): unit-norm backbone features share a large common component,
    # which makes plain SGD crawl. The extra sqrt(D) keeps rows at mean squared norm 1, so the
    # lr grid means the same for any width. The map is folded back into W and b below.
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6) * math.sqrt(d)
    x = (x - mean) / std
    c = num_classes
    # (D, G, C) so that all G classifiers are one (B, D) @ (D, G*C) product per step.
    w = torch.zeros(d, g, c, device=device)
    b = torch.zeros(g, c, device=device)
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    lr = torch.tensor(lrs, dtype=torch.float32, device=device)
    wd = torch.tensor(weight_decays, dtype=torch.float32, device=device).view(1, g, 1)
    bs = n if batch_size <= 0 else min(batch_size, n)
    total = epochs * math.ceil(n / bs)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device) if bs < n else None
        for start in range(0, n, bs):
            idx = order[start:start + bs] if order is not None else slice(None)
            xb, yb = x[idx], y[idx]
            m = yb.numel()
            probs = torch.softmax((xb @ w.view(d, g * c) + b.view(-1)).view(m, g, c), dim=2)
            probs[torch.arange(m, device=device), :, yb] -= 1.0  # d CE / d logits
            probs /= m
            gw = (xb.T @ probs.view(m, g * c)).view(d, g, c) + wd * w
            vw.mul_(momentum).add_(gw)
            vb.mul_(momentum).add_(probs.sum(dim=0))
            scale = lr * (0.5 * (1.0 + math.cos(math.pi * step / total)))
            w -= scale.view(1, g, 1) * vw
            b -= scale.view(g, 1) * vb
            step += 1
    w = w / std.view(d, 1, 1)  # logits = ((x - mean) / std) W + b = x W' + b'
    b = b - torch.einsum("d,dgc->gc", mean, w)
    return w.permute(1, 0, 2).contiguous(), b


def score_linear(w: Tensor, b: Tensor, x: Tensor, y: Tensor,
                 top_k: int = TOP_K) -> tuple[Tensor, Tensor, Tensor]:
    """Top-1, top-``k`` accuracy and mean cross-entropy of each of ``G`` classifiers.

    Labels ``< 0`` (classes the classifier never saw) count as wrong and are left out of the
    loss. ``k`` is capped at the number of classes.

    Returns:
        Three ``(G,)`` float tensors on CPU: top-1, top-k, loss (``inf`` if no valid label).
    """
    x = x.to(device=w.device, dtype=torch.float32)
    y = y.to(device=w.device, dtype=torch.int64)
    logits = x @ w + b.unsqueeze(1)  # (G, N, C)
    top = logits.topk(min(top_k, w.shape[2]), dim=2).indices
    hit = top == y.view(1, -1, 1)
    top1 = hit[:, :, 0].double().mean(dim=1)
    topk = hit.any(dim=2).double().mean(dim=1)
    known = y >= 0
    if known.any():
        loss = torch.stack([F.cross_entropy(lg[known], y[known]) for lg in logits])
    else:
        loss = torch.full((w.shape[0],), math.inf)
    return top1.cpu(), topk.cpu(), loss.double().cpu()


def select_hyperparameters(x: Tensor, y: Tensor, num_classes: int, cfg: LinearConfig,
                           seed: int = 0,
                           device: torch.device | str = "cpu") -> tuple[float, float]:
    """The ``(lr, weight_decay)`` of ``cfg``'s grid with the best validation top-1.

    The validation split is carved from ``x``/``y`` (the train features only) by
    :func:`stratified_split`; ties go to the lower validation loss, then to grid order; a
    pair whose loss diverged (not finite) ranks last. Without a validation sample (every
    class has a single sample) the first pair is used.

    Args:
        x: ``(N, D)`` train features; ``y``: their ``(N,)`` labels in ``[0, num_classes)``.
        cfg: The grid and training settings.
        seed: Seed of the split and of the batch order.
        device: Where the training runs.
    """
    fit, val = stratified_split(y.numpy(), cfg.val_fraction, seed)
    grid = [(lr, wd) for lr in cfg.lrs for wd in cfg.weight_decays]
    if val.size == 0 or len(grid) == 1:
        if val.size == 0:
            log.warning("linear: no class has 2 train samples; no validation split, using "
                        "lr=%g, weight_decay=%g", *grid[0])
        return grid[0]
    fit_t, val_t = torch.from_numpy(fit), torch.from_numpy(val)
    w, b = train_linear(x[fit_t], y[fit_t], num_classes, [p[0] for p in grid],
                        [p[1] for p in grid], cfg.epochs, cfg.batch_size, cfg.momentum, seed,
                        device)
    top1, _, loss = score_linear(w, b, x[val_t], y[val_t])
    # A diverged pair (non-finite loss) ranks last, whatever its accuracy reads.
    best = min(range(len(grid)), key=lambda i: (not math.isfinite(float(loss[i])),
                                                -float(top1[i]), float(loss[i]), i))
    return grid[best]


def _class_index(classes: np.ndarray, labels: np.ndarray) -> Tensor:
    """Labels as indices into sorted ``classes``; a label not in ``classes`` becomes ``-1``."""
    pos = np.clip(np.searchsorted(classes, labels), 0, classes.size - 1)
    return torch.from_numpy(np.where(classes[pos] == labels, pos, -1).astype(np.int64))


@register_protocol
class LinearProtocol(EvalProtocol):
    """``linear_top1/<level>``, ``linear_top5/<level>`` (levels with more than 5 classes):
    a logistic-regression probe on the frozen train features, scored on the test features."""

    name = "linear"
    Config = LinearConfig
    level_metrics = ("linear_top1", "linear_top5")

    def run(self, inputs: EvalInputs) -> dict[str, float]:
        cfg: LinearConfig = self.config
        metrics: dict[str, float] = {}
        for lv in inputs.levels():
            classes = np.unique(lv.train_y)
            y_train = _class_index(classes, lv.train_y)
            # Only train features go into the sweep; the test split is touched once, below.
            lr, wd = select_hyperparameters(lv.train_x, y_train, classes.size, cfg,
                                            inputs.seed, inputs.device)
            log.info("linear/%s: lr=%g, weight_decay=%g (picked on a validation split of "
                     "train)", lv.name, lr, wd)
            w, b = train_linear(lv.train_x, y_train, classes.size, [lr], [wd], cfg.epochs,
                                cfg.batch_size, cfg.momentum, inputs.seed, inputs.device)
            top1, topk, _ = score_linear(w, b, lv.test_x, _class_index(classes, lv.test_y))
            metrics[f"linear_top1/{lv.name}"] = float(top1[0])
            if classes.size > TOP_K:
                metrics[f"linear_top5/{lv.name}"] = float(topk[0])
        return metrics
