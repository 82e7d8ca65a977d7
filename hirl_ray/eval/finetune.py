"""Full fine-tuning of the pretrained backbone plus a linear head (protocol ``finetune``).

The backbone (a fresh trainable copy, ``EvalInputs.encoder()``) and a new linear head are
trained end to end with cross-entropy on the labelled train split at one label level, then
top-1 (and top-5) accuracy is measured on the test split. This is the "fine-tuning" protocol of
SimCLR (Chen et al. 2020, Sec. 6 / App. B.5: only random crop with resize and flip as
augmentation) and of HIRL (Xu et al. 2022, Sec. 5.2); as in Barlow Twins' ``evaluate.py``
(Zbontar et al. 2021) and SwAV's ``eval_semisup.py`` (Caron et al. 2020), the backbone may
get a smaller learning rate than the head (``backbone_lr_scale``) and the rate follows a
cosine decay. :func:`train_classifier` and :func:`finetune_scores` are shared with the
``semisup`` protocol (:mod:`hirl_ray.eval.semisup`), which trains the same way on 1% / 10%
label subsets.

Augmentation runs on the evaluation transform's normalised tensors (torchvision
``transforms.v2``), per sample: a random resized crop back to the input size and a horizontal
flip. Random draws (head init, shuffling, augmentation) come from ``EvalInputs.seed`` inside
a forked RNG, so a protocol run is reproducible and leaves the global RNG untouched.

Pure PyTorch / numpy; nothing here imports ``ray``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from hirl_ray.config import ConfigError, check_choice, check_positive
from hirl_ray.eval.protocol import EvalInputs, EvalProtocol, register_protocol
from hirl_ray.logs import get_logger
from hirl_ray.schedules import cosine_lr

log = get_logger(__name__)

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class FinetuneConfig:
    """``eval.params.finetune``: how the backbone and the linear head are trained.

    Attributes:
        level: Label level index to classify (0 = finest); ``None`` = the finest level with
            labelled samples in both splits.
        epochs: Passes over the labelled training samples.
        batch_size: Samples per step (capped at the number of training samples).
        optimizer: ``sgd`` (Nesterov momentum) or ``adamw``.
        lr: Peak learning rate of the head; cosine decay to 0 over all steps.
        backbone_lr_scale: The backbone's rate is ``lr * backbone_lr_scale`` (0 freezes its
            weights; BatchNorm statistics still adapt).
        weight_decay: Decoupled (AdamW) or L2 (SGD) weight decay on every parameter.
        momentum: SGD momentum.
        augment: Random resized crop + horizontal flip on the training images.
        crop_scale: Area range ``(min, max)`` of the random resized crop (light by default).
        loader_workers: DataLoader worker processes (0 = in the main process).
    """

    level: int | None = None
    epochs: int = 20
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.1
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.9
    augment: bool = True
    crop_scale: tuple[float, ...] = (0.5, 1.0)
    loader_workers: int = 0

    def check(self, where: str) -> None:
        check_positive(self, where, "epochs", "batch_size", "lr")
        check_positive(self, where, "backbone_lr_scale", "weight_decay", "loader_workers",
                       strict=False)
        check_choice(f"{where}.optimizer", self.optimizer, OPTIMIZERS)
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{where}.momentum must be in [0, 1), got {self.momentum}")
        if self.level is not None and self.level < 0:
            raise ConfigError(f"{where}.level must be >= 0 (0 = finest) or null, "
                              f"got {self.level}")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"{where}.crop_scale must be [min, max] with 0 < min <= max <= 1, "
                              f"got {list(self.crop_scale)}")


def require_backbone(inputs: EvalInputs, protocol: str) -> None:
    """Raise the one-line ConfigError of a protocol that trains the backbone but has none."""
    if inputs.encoder is None or inputs.train_images is None or inputs.test_images is None:
        raise ConfigError(f"eval.protocols: {protocol} needs the backbone; run it on a "
                          "checkpoint (hirl_ray.evaluate / hirl-ray eval), not on features")


@dataclass(frozen=True)
class LevelTask:
    """One label level as a classification task: labels remapped to ``0..num_classes-1``.

    ``train_y`` / ``test_y`` have one entry per dataset row; ``-1`` = unlabelled there.
    """

    index: int
    name: str
    num_classes: int
    train_y: np.ndarray
    test_y: np.ndarray


def level_task(inputs: EvalInputs, level: int | None, where: str) -> LevelTask | None:
    """The task at ``level`` (``None``: the finest level labelled in both splits).

    Returns ``None`` for unlabelled data (no level with labels in both splits).
    """
    if inputs.num_levels == 0:
        return None
    if level is not None and level >= inputs.num_levels:
        n = inputs.num_levels
        raise ConfigError(f"{where}.level={level} but the data has {n} label levels "
                          f"({', '.join(inputs.level_names)}); use 0..{n - 1} or null")
    candidates = range(inputs.num_levels) if level is None else (level,)
    for j in candidates:
        tr, te = inputs.train_labels[:, j], inputs.test_labels[:, j]
        if (tr >= 0).any() and (te >= 0).any():
            classes = np.unique(np.concatenate([tr[tr >= 0], te[te >= 0]]))
            return LevelTask(j, inputs.level_names[j], len(classes),
                             _remap(tr, classes), _remap(te, classes))
    return None


def _remap(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    out = np.full(y.shape, -1, dtype=np.int64)
    out[y >= 0] = np.searchsorted(classes, y[y >= 0])
    return out


class LabelledImages(Dataset):
    """``images`` restricted to ``indices``: ``(transform(image), targets[index])``.

    ``images`` yields ``(image, index)``; the yielded index (a row of the label arrays) picks
    the target, so a wrapped dataset may reorder rows without mislabelling them.
    """

    def __init__(self, images: Dataset, indices: np.ndarray, targets: np.ndarray,
                 transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.images, self.indices, self.targets = images, np.asarray(indices), targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[Tensor, int]:
        image, index = self.images[int(self.indices[j])][:2]
        image = torch.as_tensor(image)
        return (self.transform(image) if self.transform else image), int(self.targets[int(index)])


class TensorAugment:
    """Light augmentation of one normalised ``(3, H, W)`` tensor: random resized crop back
    to ``(H, W)`` with area in ``scale``, then a horizontal flip with probability 1/2."""

    def __init__(self, scale: Sequence[float]) -> None:
        self.scale = (float(scale[0]), float(scale[1]))
        self._ops: dict[tuple[int, int], v2.Compose] = {}

    def __call__(self, image: Tensor) -> Tensor:
        size = (int(image.shape[-2]), int(image.shape[-1]))
        if size not in self._ops:
            self._ops[size] = v2.Compose([
                v2.RandomResizedCrop(size, scale=self.scale, antialias=True),
                v2.RandomHorizontalFlip()])
        return self._ops[size](image)


def _optimizer(params: list[dict[str, Any]], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the CPU (and ``device``'s) RNG for the block, restoring the caller's afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()
               ] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def probe_feat_dim(encoder: nn.Module, images: Dataset) -> int:
    """Width of ``encoder``'s output on the first image of ``images`` (eval mode, no grad)."""
    device = next(encoder.parameters(), torch.empty(0)).device
    image = torch.as_tensor(images[0][0])[None].to(device)
    was_training = encoder.training
    with torch.no_grad():
        width = int(encoder.eval()(image).shape[1])
    encoder.train(was_training)
    return width


def train_classifier(encoder: nn.Module, feat_dim: int, num_classes: int, images: Dataset,
                     indices: np.ndarray, targets: np.ndarray, cfg: FinetuneConfig,
                     device: torch.device | str = "cpu", seed: int = 0) -> nn.Sequential:
    """Fine-tune ``encoder`` and a new linear head on ``images[indices]``; cross-entropy.

    Args:
        encoder: Trainable backbone, ``(B, 3, H, W) -> (B, feat_dim)``; trained in place.
        feat_dim: Its output width.
        num_classes: Outputs of the head; ``targets`` are in ``0..num_classes-1``.
        images: Dataset of ``(image, index)``; only rows ``indices`` are read.
        indices: Dataset rows to train on (every one must have ``targets[row] >= 0``).
        targets: ``(N,)`` class of every dataset row.
        cfg: Optimiser, schedule and augmentation settings.
        device: Where the model trains.
        seed: Seeds head init, shuffling and augmentation.

    Returns:
        ``nn.Sequential(encoder, head)`` in eval mode.
    """
    device = torch.device(device)
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0 or (targets[indices] < 0).any():
        raise ValueError("train_classifier: need at least one row, each with a label >= 0")
    with _forked_rng(device, seed), torch.enable_grad():
        head = nn.Linear(feat_dim, num_classes)
        nn.init.normal_(head.weight, std=0.01)  # MoCo's lincls init: start near uniform
        nn.init.zeros_(head.bias)
        model = nn.Sequential(encoder, head).to(device).train()
        opt = _optimizer([{"params": encoder.parameters(), "lr": cfg.lr * cfg.backbone_lr_scale},
                          {"params": head.parameters(), "lr": cfg.lr}], cfg)
        base_lrs = [g["lr"] for g in opt.param_groups]
        data = LabelledImages(images, indices, targets,
                              TensorAugment(cfg.crop_scale) if cfg.augment else None)
        batch = min(cfg.batch_size, len(data))
        # drop_last keeps every step's batch full (a lone sample breaks BatchNorm's statistics);
        # shuffling still shows every sample across epochs.
        loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=len(data) > batch,
                            num_workers=cfg.loader_workers,
                            generator=torch.Generator().manual_seed(seed))
        total, step = cfg.epochs * len(loader), 0
        for epoch in range(cfg.epochs):
            running = 0.0
            for x, y in loader:
                for group, base in zip(opt.param_groups, base_lrs, strict=True):
                    group["lr"] = cosine_lr(base, step, total)
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += loss.item()
                step += 1
            log.debug("fine-tune epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs,
                      running / max(1, len(loader)))
    return model.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, images: Dataset, indices: np.ndarray,
                   batch_size: int = 256, device: torch.device | str = "cpu",
                   workers: int = 0) -> tuple[Tensor, Tensor]:
    """``(logits (n, C), rows (n,))`` of ``model`` (in eval mode) on ``images[indices]``."""
    rows = np.asarray(indices, dtype=np.int64)
    # "targets" = the row itself, so each batch says which rows its logits belong to.
    loader = DataLoader(LabelledImages(images, rows, np.arange(len(images))),
                        batch_size=batch_size, shuffle=False, num_workers=workers)
    logits, seen = [], []
    for x, index in loader:
        logits.append(model(x.to(device)).float().cpu())
        seen.append(index)
    return torch.cat(logits), torch.cat(seen)


def topk_accuracy(logits: Tensor, targets: Tensor, k: int) -> float:
    """Fraction of rows whose target is among the ``k`` largest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == targets.reshape(-1, 1)).any(dim=1).double().mean())


def finetune_scores(inputs: EvalInputs, task: LevelTask, train_rows: np.ndarray,
                    cfg: FinetuneConfig, prefix: str) -> dict[str, float]:
    """Train a fresh backbone copy + head on ``train_rows`` and score the test split.

    Returns:
        ``{<prefix>_top1/<level>: acc}`` plus ``<prefix>_top5/<level>`` when the level has at
        least 5 classes; accuracies in ``[0, 1]`` over the labelled test samples.
    """
    assert inputs.encoder is not None and inputs.train_images is not None
    assert inputs.test_images is not None
    encoder = inputs.encoder()
    feat_dim = inputs.feat_dim or probe_feat_dim(encoder, inputs.train_images)
    log.info("%s: training on %d samples of level %s (%d classes), %d epochs", prefix,
             len(train_rows), task.name, task.num_classes, cfg.epochs)
    model = train_classifier(encoder, feat_dim, task.num_classes, inputs.train_images,
                             train_rows, task.train_y, cfg, inputs.device, inputs.seed)
    test_rows = np.flatnonzero(task.test_y >= 0)
    logits, rows = predict_logits(model, inputs.test_images, test_rows, cfg.batch_size,
                                  inputs.device, cfg.loader_workers)
    y = torch.from_numpy(task.test_y)[rows]
    out = {f"{prefix}_top1/{task.name}": topk_accuracy(logits, y, 1)}
    if task.num_classes >= 5:
        out[f"{prefix}_top5/{task.name}"] = topk_accuracy(logits, y, 5)
    return out


@register_protocol
class FinetuneProtocol(EvalProtocol):
    """``finetune_top1/<level>`` (and ``_top5``): backbone + linear head fine-tuned on all
    labelled train samples of one level (``eval.params.finetune.level``)."""

    name = "finetune"
    Config = FinetuneConfig
    #: Trains a copy of the backbone: needs ``EvalInputs.encoder`` / ``*_images`` (a
    #: checkpoint's evaluation), so online evaluation during training should skip it.
    needs_backbone: ClassVar[bool] = True
    # Keys read <prefix>/<level> but only one level is scored, so these are not level_metrics
    # (which promise a key at every label level, e.g. for tune.metric).
    metric_prefixes = ("finetune_top1", "finetune_top5")

    def run(self, inputs: EvalInputs) -> dict[str, float]:
        require_backbone(inputs, self.name)
        task = level_task(inputs, self.config.level, f"eval.params.{self.name}")
        if task is None:
            return {}
        return finetune_scores(inputs, task, np.flatnonzero(task.train_y >= 0), self.config,
                               "finetune")
