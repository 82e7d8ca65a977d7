"""Load a trained backbone and evaluate a checkpoint (pure PyTorch; no Ray).

:func:`run_checkpoint_evaluation` is the one path from a checkpoint to metrics: the final
evaluation of a fit (:func:`evaluate_checkpoint`), ``hirl_ray.evaluate`` and ``hirl-ray eval``
all go through it.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from hirl_ray import storage
from hirl_ray.config import (
    PROTOCOLS,
    SECTIONS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    from_dict,
    parse_override,
    to_plain,
)
from hirl_ray.data import ViewDataset, build_dataset, eval_transform
from hirl_ray.eval.protocol import EvalInputs
from hirl_ray.eval.report import build_inputs, run_grouped
from hirl_ray.hierarchy.snapshot import latest_snapshot, load_hierarchy
from hirl_ray.logs import get_logger
from hirl_ray.models import build_backbone
from hirl_ray.runs import LAYOUT
from hirl_ray.train.checkpoint import META_FILE, latest_good_checkpoint, load_state, read_meta

BACKBONE_PREFIX = "method.backbone."

log = get_logger(__name__)


def resolve_checkpoint(path: str | Path) -> str:
    """A checkpoint folder, or a run folder (its newest good checkpoint: a torn or damaged
    newer one is skipped with a warning); local or ``s3://``."""
    path = storage.resolve(path)
    if storage.exists(storage.join(path, META_FILE)):
        return path
    found = latest_good_checkpoint(path)
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
    backbone, _ = _trained_backbone(path, cfg)
    return backbone.to(device).eval(), eval_transform(cfg.data.image_size)


def _trained_backbone(path: str, cfg: ExperimentConfig) -> tuple[nn.Module, int]:
    """``(backbone with the checkpoint's weights, feature dimension)``, on CPU."""
    from hirl_ray.methods import METHODS

    backbone, feat_dim = build_backbone(cfg.model, cfg.data.image_size)
    state = load_state(path)["model"]
    # The method's evaluated network (DINO/iBOT: the teacher, as the official code).
    name = getattr(METHODS.get(cfg.method.name), "eval_backbone", "backbone")
    prefix = BACKBONE_PREFIX if name == "backbone" else f"method.{name}."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if getattr(backbone, "mask_token", 0) is None:  # a ViT without masking: the [MASK] token
        weights.pop("mask_token", None)  # of BEiT/iBOT is pre-training only, not a feature
    backbone.load_state_dict(weights)
    return backbone, feat_dim


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


class _Progress:
    """Iterate ``loader`` under a tqdm bar (made on first use, so nothing prints before)."""

    def __init__(self, loader: DataLoader, desc: str, enabled: bool) -> None:
        self.loader, self.desc, self.enabled = loader, desc, enabled

    def __iter__(self) -> Iterator:
        if not self.enabled:
            return iter(self.loader)
        from tqdm import tqdm

        return iter(tqdm(self.loader, desc=self.desc, unit="batch", leave=False))

    def __len__(self) -> int:
        return len(self.loader)


@dataclass(frozen=True)
class CheckpointEvaluation:
    """Outcome of :func:`run_checkpoint_evaluation`.

    Attributes:
        checkpoint: The checkpoint folder evaluated.
        run_dir: Its run folder (``None`` for a checkpoint outside the run layout).
        config: The run's config with the evaluated ``data:`` and ``eval:`` sections.
        metrics: ``{protocol: {key: value}}`` in the order of ``config.eval.protocols``.
        inputs: The shared inputs (features of both splits cached once extracted).
        same_data: Whether ``config.data`` is the data the run trained on (then the run's
            prototype hierarchy indexes its train split).
    """

    checkpoint: str
    run_dir: str | None
    config: ExperimentConfig
    metrics: dict[str, dict[str, float]]
    inputs: EvalInputs
    same_data: bool

    @property
    def flat_metrics(self) -> dict[str, float]:
        """Every protocol's metrics in one dict (what ``fit`` reports)."""
        return {k: v for group in self.metrics.values() for k, v in group.items()}


def eval_config(run_config: Mapping[str, Any], data: Mapping[str, Any] | DataConfig | None = None,
                protocols: str | Sequence[str] | None = None,
                overrides: Mapping[str, Any] | Iterable[str] | None = None,
                source: str = "checkpoint") -> ExperimentConfig:
    """The run's config with another ``data:`` section, protocol list or protocol settings.

    Args:
        run_config: The run's config as saved in its checkpoint (a plain dict).
        data: A :class:`DataConfig`, used as given, or a mapping of ``data:`` keys. A mapping
            with the run's ``name`` (or none) overrides the run's keys; one naming another
            dataset starts from the defaults and keeps only the run's ``image_size`` and
            ``loader_workers`` (the backbone was built for that size).
        protocols: Protocol names, or ``"all"`` for every registered one; ``None`` keeps the
            run's ``eval.protocols``. Settings of protocols left out are dropped.
        overrides: ``eval.params.<protocol>.<key>`` values (``{"eval.params.knn.k": 10}`` or
            ``["knn.k=10"]``; the ``eval.params.`` prefix may be left out).
        source: Names the config in error messages.

    Raises:
        ConfigError: An override of another section, or any value the strict loader refuses.
    """
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in run_config.items()}
    if data is not None:
        raw["data"] = _data_section(raw.get("data") or {}, data)
    if protocols is not None:
        names = [protocols] if isinstance(protocols, str) else list(protocols)
        if names == ["all"]:
            names = list(PROTOCOLS.names())
        section = dict(raw.get("eval") or {})
        params = section.get("params") or {}
        section["protocols"] = names
        section["params"] = {k: v for k, v in params.items() if k in names}
        raw["eval"] = section
    return from_dict(raw, _param_overrides(overrides), source=source)


def _data_section(run_data: Mapping[str, Any], data: Mapping[str, Any] | DataConfig
                  ) -> dict[str, Any]:
    if isinstance(data, DataConfig):
        return to_plain(data)
    if not isinstance(data, Mapping):
        raise ConfigError(f"evaluate: data must be a data: mapping or a DataConfig, got "
                          f"{type(data).__name__}")
    name = data.get("name", run_data.get("name", DataConfig.name))
    if name == run_data.get("name", DataConfig.name):
        return {**run_data, **data}
    kept = {k: run_data[k] for k in ("image_size", "loader_workers") if k in run_data}
    return {**kept, **data}


def _param_overrides(overrides: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        overrides = dict(parse_override(o) for o in overrides)
    out = {}
    for key, value in overrides.items():
        section = key.partition(".")[0]
        if section == "eval" and not key.startswith("eval.params."):
            raise ConfigError(f"evaluate: override {key!r}: only eval.params.<protocol>.<key> "
                              "can be set here; pass protocols=[...] for eval.protocols")
        if section in SECTIONS and section != "eval":
            raise ConfigError(f"evaluate: override {key!r}: only eval.params.<protocol>.<key> "
                              "can be set; pass data={...} for the dataset")
        out[key if section == "eval" else f"eval.params.{key}"] = value
    return out


def _sample_keys(cfg: DataConfig) -> DataConfig:
    """``cfg`` without the keys that do not change which samples a split holds."""
    return dataclasses.replace(cfg, loader_workers=0, on_bad_file="error", loader="torch",
                               ray_data_cpus=1.0, ray_data_max_actors=0)


def run_checkpoint_evaluation(
    checkpoint: str | Path,
    data: Mapping[str, Any] | DataConfig | None = None,
    protocols: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    hierarchy_dir: str | Path | None = None,
    progress: bool | None = None,
    batch_size: int = 256,
    run_config: Mapping[str, Any] | None = None,
) -> CheckpointEvaluation:
    """Evaluate a checkpoint's backbone with the run's (or the given) protocols and data.

    The checkpoint's config is loaded, ``data``/``protocols``/``overrides`` are applied and
    checked (:func:`eval_config`) before any image is read. Frozen features of both splits
    are extracted at most once and shared by every protocol (:class:`EvalInputs`); protocols
    that train (fine-tuning) also get ``encoder`` (a fresh trainable copy of the backbone),
    ``feat_dim`` and ``train_images``/``test_images`` (eval-transformed ``(image, index)``),
    when this version of :class:`EvalInputs` has those fields.

    Args:
        checkpoint: A checkpoint folder or a run folder (its newest); local or ``s3://``.
        data: Evaluate on this ``data:`` section instead of the run's (:func:`eval_config`).
        protocols: Protocol names; ``None`` runs the run's ``eval.protocols``.
        overrides: ``eval.params.*`` settings.
        device: Where the backbone runs.
        hierarchy_dir: The run's prototype snapshots (for the ``consistency`` protocol);
            ignored when ``data`` is not the data the run trained on.
        progress: Show tqdm bars while extracting features; ``None``: when stdout is a tty.
        batch_size: Images per forward pass of the feature extraction.
        run_config: The run's config when the caller holds it as trained (the checkpoint's
            copy has secrets redacted, e.g. credentials in a ``data.root`` URI).
    """
    path = resolve_checkpoint(checkpoint)
    run_cfg = dict(run_config) if run_config is not None else read_meta(path).config
    cfg = eval_config(run_cfg, data, protocols, overrides, source=f"{path} (its config)")
    trained = from_dict(run_cfg)
    same_data = _sample_keys(cfg.data) == _sample_keys(trained.data)
    backbone, feat_dim = _trained_backbone(path, trained)
    backbone = backbone.to(device).eval()

    def fresh_backbone() -> nn.Module:
        """A trainable copy of the pretrained backbone (fine-tuning must not touch ours)."""
        return copy.deepcopy(backbone).train().requires_grad_(True)

    show = sys.stdout.isatty() if progress is None else progress
    splits = {}
    for split in ("train", "test"):
        # data.loader=ray_data: an s3:// image folder is read object by object, as in training.
        ds = build_dataset(cfg.data, split, local_copy=cfg.data.loader != "ray_data")
        images = ViewDataset(ds, eval_transform(cfg.data.image_size))
        loader = DataLoader(images, batch_size=batch_size, shuffle=False,
                            num_workers=cfg.data.loader_workers,
                            pin_memory=torch.device(device).type == "cuda")
        splits[split] = (ds, images, _Progress(loader, f"features {split}", show))
    hierarchy = None
    if hierarchy_dir is not None and same_data:
        snapshot = latest_snapshot(hierarchy_dir)
        hierarchy = load_hierarchy(snapshot) if snapshot is not None else None
    elif hierarchy_dir is not None:
        log.info("evaluating on other data than the run's: its prototype hierarchy is not used")
    (train, train_images, train_loader), (test, test_images, test_loader) = splits.values()
    inputs = build_inputs(
        backbone, train_loader, test_loader, train.labels, test.labels, train.level_names,
        device=device, seed=cfg.train.seed, hierarchy=hierarchy,
        extra={"encoder": fresh_backbone, "feat_dim": feat_dim,
               "cluster_sizes": tuple(trained.hirl.num_clusters),
               "train_images": train_images, "test_images": test_images})
    metrics = run_grouped(cfg.eval.protocols, inputs, cfg.eval.params)
    return CheckpointEvaluation(path, LAYOUT.run_of_checkpoint(path), cfg, metrics, inputs,
                                same_data)


def evaluate_checkpoint(checkpoint: str | Path, hierarchy_dir: str | Path | None = None,
                        device: str | torch.device = "cpu",
                        run_config: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The run's ``eval.protocols`` on the checkpoint's backbone, as one flat dict (the final
    evaluation of a fit; :func:`run_checkpoint_evaluation` with the run's data and settings).

    By default: kNN accuracy and clustering NMI/ARI/accuracy per label level, plus how well the
    learned prototype tree matches the label tree when both exist.
    """
    return run_checkpoint_evaluation(checkpoint, device=device, hierarchy_dir=hierarchy_dir,
                                     progress=False, run_config=run_config).flat_metrics
