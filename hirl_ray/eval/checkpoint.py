"""Load a trained backbone and evaluate a checkpoint (pure PyTorch; no Ray)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from hirl_ray import storage
from hirl_ray.config import ExperimentConfig, from_dict
from hirl_ray.data import ViewDataset, build_dataset, eval_transform
from hirl_ray.eval.report import run_evaluation
from hirl_ray.hierarchy.snapshot import latest_snapshot, load_hierarchy
from hirl_ray.models import build_backbone
from hirl_ray.runs import LAYOUT
from hirl_ray.train.checkpoint import META_FILE, latest_checkpoint, load_state, read_meta

BACKBONE_PREFIX = "method.backbone."


def resolve_checkpoint(path: str | Path) -> str:
    """A checkpoint folder, or a run folder (its newest checkpoint); local or ``s3://``."""
    path = storage.resolve(path)
    if storage.exists(storage.join(path, META_FILE)):
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no hirl_ray checkpoint at {path}; pass a run folder "
                                "(storage.path/storage.name) or one of its "
                                f"{LAYOUT.train}/epoch_* folders")
    return found


def load_backbone(checkpoint: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    """Backbone weights only (lightly #1475): ``(module, preprocess)``.

    ``module`` maps a batch of preprocessed images (B, 3, S, S) to (B, D) features and is
    in eval mode; ``preprocess`` is the torchvision transform for one PIL image.
    """
    path = resolve_checkpoint(checkpoint)
    cfg = from_dict(read_meta(path).config)
    backbone, _ = build_backbone(cfg.model, cfg.data.image_size)
    state = load_state(path)["model"]
    weights = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items()
               if k.startswith(BACKBONE_PREFIX)}
    backbone.load_state_dict(weights)
    return backbone.to(device).eval(), eval_transform(cfg.data.image_size)


def load_cluster_encoder(checkpoint: str | Path, device: str | torch.device = "cpu"
                         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The features the run's prototype hierarchy was built from (``hirl.embedding``).

    Maps preprocessed images (B, 3, S, S) to L2-normalised (B, D) features in the space of the
    hierarchy's centroids (by default the target network's projector output), in eval mode.
    """
    from hirl_ray.methods.hirl import HirlModel

    path = resolve_checkpoint(checkpoint)
    model = HirlModel.from_config(from_dict(read_meta(path).config))
    model.load_state_dict(load_state(path)["model"])
    return model.to(device).eval().cluster_embed


def _loader(cfg: ExperimentConfig, split: str) -> tuple[DataLoader, np.ndarray, tuple[str, ...]]:
    ds = build_dataset(cfg.data, split)
    loader = DataLoader(ViewDataset(ds, eval_transform(cfg.data.image_size)), batch_size=256,
                        shuffle=False, num_workers=cfg.data.loader_workers)
    return loader, ds.labels, ds.level_names


def evaluate_checkpoint(checkpoint: str | Path, hierarchy_dir: str | Path | None = None,
                        device: str | torch.device = "cpu") -> dict[str, float]:
    """The run's ``eval.protocols`` on the checkpoint's backbone (by default kNN accuracy and
    clustering NMI/ARI/accuracy per label level, plus how well the learned prototype tree
    matches the label tree when both exist)."""
    path = resolve_checkpoint(checkpoint)
    cfg = from_dict(read_meta(path).config)
    backbone, _ = load_backbone(path, device)
    train_loader, train_labels, names = _loader(cfg, "train")
    test_loader, test_labels, _ = _loader(cfg, "test")
    snapshot = latest_snapshot(hierarchy_dir) if hierarchy_dir else None
    hierarchy = load_hierarchy(snapshot) if snapshot is not None else None
    return run_evaluation(backbone, cfg.eval, train_loader, test_loader, train_labels,
                          test_labels, names, device=device, seed=cfg.train.seed,
                          hierarchy=hierarchy)
