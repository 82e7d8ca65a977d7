"""Run folders and run preparation, shared by :func:`hirl_ray.fit` and :func:`hirl_ray.tune`.

:class:`RunLayout` is the one place that names what a run folder (``storage.path/
storage.name``) and a sweep folder hold; code asks it for paths instead of spelling folder
names. :func:`inspect_data` (:func:`check_data`), :func:`prepare_run` and :func:`rebuild_memory`
are the checks and decisions every run goes through before Ray starts (with
:func:`hirl_ray.resources.check_local_resources`); ``api`` and ``sweep`` both import them
from here (nothing below ``api``/``cli``/``sweep`` calls them). :class:`FitResult` is what a
fit hands back. No Ray here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from hirl_ray import storage
from hirl_ray.config import METHODS, ConfigError, ExperimentConfig
from hirl_ray.data import describe_split
from hirl_ray.hierarchy.memory import (
    RebuildMemory,
    check_rebuild_memory,
    node_memory_bytes,
    rebuild_estimate,
)
from hirl_ray.logs import get_logger, redact
from hirl_ray.methods import build_method

log = get_logger(__name__)


@dataclass(frozen=True)
class RunLayout:
    """Names of the files and folders in a run folder and in a sweep folder.

    Run folder (local or remote, e.g. ``s3://``; paths are ``str``)::

        config.yaml      the resolved experiment (resume refuses an incompatible one)
        metrics.json     final evaluation of a fit
        train/           Ray Train's run (``RunConfig.name``): checkpoints epoch_NNNN/
        hierarchy/       prototype snapshots hierarchy_vNNNNNN.pt (+ .json origin)
        tensorboard/     a fit's TensorBoard event files (README "Watching a run")
        mlflow.json      the MLflow run of a fit (observe.mlflow), continued on resume
        wandb.json       the W&B run of a fit (observe.wandb), continued on resume
        wandb/           W&B's local files of that run (offline: what ``wandb sync`` uploads)
        status.json      a fit's live state, read by ``hirl-ray status`` (hirl_ray.status)
        params.json      a sweep trial's sampled values
        placement_group.txt   a sweep trial's Train placement group (freed when it ends)

    Sweep folder (local only; paths are :class:`~pathlib.Path`)::

        sweep.json       base experiment, tune section, data size
        optuna.db        the Optuna study (SQLite default)
        tune/            Ray Tune's experiment (restorable), one folder per trial
        trials/<id>/     each trial's run folder (the layout above)
        results.csv      one row per trial
        report/          ``hirl-ray report`` output
    """

    config: str = "config.yaml"
    metrics: str = "metrics.json"
    train: str = "train"
    hierarchy: str = "hierarchy"
    tensorboard: str = "tensorboard"
    mlflow: str = "mlflow.json"
    wandb: str = "wandb.json"
    status: str = "status.json"
    params: str = "params.json"
    placement_group: str = "placement_group.txt"
    stopped: str = "stopped.json"
    sweep: str = "sweep.json"
    optuna_db: str = "optuna.db"
    tune: str = "tune"
    trials: str = "trials"
    results: str = "results.csv"
    report: str = "report"

    # ---- a run folder ----
    def config_file(self, run_dir: str | Path) -> str:
        return storage.join(run_dir, self.config)

    def metrics_file(self, run_dir: str | Path) -> str:
        return storage.join(run_dir, self.metrics)

    def train_dir(self, run_dir: str | Path) -> str:
        """Ray Train's run folder (its checkpoints are our ``epoch_NNNN`` folders)."""
        return storage.join(run_dir, self.train)

    @staticmethod
    def checkpoint_name(epoch: int) -> str:
        """The folder of the checkpoint taken after ``epoch`` epochs (``epoch_0010``)."""
        return f"epoch_{epoch:04d}"

    def hierarchy_dir(self, run_dir: str | Path) -> str:
        return storage.join(run_dir, self.hierarchy)

    def tensorboard_dir(self, run_dir: str | Path) -> str:
        return storage.join(run_dir, self.tensorboard)

    def mlflow_file(self, run_dir: str | Path) -> str:
        """The MLflow run a fit writes to (``observe.mlflow``), continued on resume."""
        return storage.join(run_dir, self.mlflow)

    def wandb_file(self, run_dir: str | Path) -> str:
        """The W&B run a fit writes to (``observe.wandb``), continued on resume."""
        return storage.join(run_dir, self.wandb)

    def status_file(self, run_dir: str | Path) -> str:
        return storage.join(run_dir, self.status)

    def params_file(self, run_dir: str | Path) -> str:
        return storage.join(run_dir, self.params)

    def placement_group_file(self, run_dir: str | Path) -> str:
        return storage.join(run_dir, self.placement_group)

    def stopped_file(self, run_dir: str | Path) -> str:
        """Why the workers stopped a run on purpose (``train.on_nan``), for the driver."""
        return storage.join(run_dir, self.stopped)

    def run_of_checkpoint(self, checkpoint: str | Path) -> str | None:
        """The run folder of ``<run>/train/epoch_NNNN``; ``None`` for a folder elsewhere."""
        parent = str(checkpoint).rstrip("/").rpartition("/")[0]
        run, _, name = parent.rpartition("/")
        return run if name == self.train and run else None

    # ---- a sweep folder (local) ----
    def sweep_file(self, sweep_dir: str | Path) -> Path:
        return Path(sweep_dir) / self.sweep

    def optuna_file(self, sweep_dir: str | Path) -> Path:
        return Path(sweep_dir) / self.optuna_db

    def tune_dir(self, sweep_dir: str | Path) -> Path:
        return Path(sweep_dir) / self.tune

    def trials_dir(self, sweep_dir: str | Path) -> Path:
        return Path(sweep_dir) / self.trials

    def trial_dir(self, sweep_dir: str | Path, trial_id: str) -> Path:
        return self.trials_dir(sweep_dir) / trial_id

    def results_file(self, sweep_dir: str | Path) -> Path:
        return Path(sweep_dir) / self.results

    def report_dir(self, sweep_dir: str | Path) -> Path:
        return Path(sweep_dir) / self.report


LAYOUT = RunLayout()


@dataclass(frozen=True)
class FitResult:
    """Outcome of :func:`hirl_ray.fit`.

    metrics: final evaluation (``knn_acc/<level>``, ``nmi/<level>``, …) and the last
    epoch's training metrics (``train/…``); checkpoint_path: the final checkpoint folder
    (give it to :func:`hirl_ray.load_backbone`); hierarchy_path: newest prototype snapshot.
    """

    metrics: dict[str, Any]
    checkpoint_path: str
    hierarchy_path: str | None
    run_dir: str


# Keys that change the network or the hierarchy's shape: a run folder trained with other
# values cannot be resumed with these, so we refuse before touching it. The method's own
# ``shape_keys`` are added per method.
RESUME_KEYS = (("model", "backbone"), ("model", "width"), ("model", "small_stem"),
               ("method", "name"), ("hirl", "enabled"), ("hirl", "num_clusters"),
               ("data", "name"), ("data", "image_size"),
               ("hirl", "embedding"))  # sets the heads' width (runs before it had none: refused)


@dataclass(frozen=True)
class DataFacts:
    """What :func:`inspect_data` learned of the train split: its size, label levels (finest
    first) and distinct labels per level (``None`` when unknown without downloading, e.g. an
    ``s3://`` image folder)."""

    num_samples: int
    level_names: tuple[str, ...]
    classes: tuple[int, ...] | None


def check_data(cfg: ExperimentConfig) -> int:
    """:func:`inspect_data`, returning the number of training samples."""
    return inspect_data(cfg).num_samples


def inspect_data(cfg: ExperimentConfig) -> DataFacts:
    """Build (an S3 image folder: count) both splits and check them against the experiment.

    Refuses, with one line naming the key or file: an empty test split, files found broken
    without decoding (:meth:`~hirl_ray.data.base.HierDataset.bad_files`), a global batch or
    ``hirl.num_clusters[0]`` larger than the train split. Warns when a label level has one
    class (pretraining needs no labels; that level's label metrics are then trivially 1).
    With a local Ray, also compares the rebuild's memory estimate with this machine (warns,
    or raises when it cannot fit).
    """
    if cfg.data.augment_on == "gpu":  # the method's views must be restatable on the device
        from hirl_ray.data.device_views import check_method_views

        check_method_views(METHODS.get(cfg.method.name), cfg.method, cfg.data)
    train = describe_split(cfg.data, "train")
    test = describe_split(cfg.data, "test")
    _check_files(cfg, train.bad_files + test.bad_files)
    n = train.size
    if test.size == 0:
        raise ConfigError(f"data.root={cfg.data.root}: the test split is empty; the final "
                          "evaluation needs test images (val/ or test/ class folders)")
    if cfg.train.batch_size > n:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {n} training "
                          f"samples of data.name={cfg.data.name!r}; lower it")
    if cfg.hirl.enabled and cfg.hirl.num_clusters[0] > n:
        raise ConfigError(f"hirl.num_clusters[0]={cfg.hirl.num_clusters[0]} exceeds the {n} "
                          f"training samples of data.name={cfg.data.name!r}; lower it")
    single = [name for name, k in zip(train.level_names, train.classes or (), strict=False)
              if k == 1]
    if single:
        log.warning("data.name=%r has a single class at label level %s: pretraining does not "
                    "need labels, but that level's label metrics (knn_acc, nmi, ...) are "
                    "trivially 1", cfg.data.name, ", ".join(single))
    if cfg.hirl.enabled and not os.environ.get("RAY_ADDRESS"):
        # Local Ray: the prototype actor runs on this machine. When joining a cluster we cannot
        # know its node yet; train_on_ray checks there once the actor is placed.
        warning = check_rebuild_memory(rebuild_memory(cfg, n), node_memory_bytes(),
                                       "this machine (local Ray)")
        if warning:
            log.warning(warning)
    return DataFacts(n, train.level_names, train.classes)


def _check_files(cfg: ExperimentConfig, bad_files: tuple[tuple[str, str], ...]) -> None:
    """Refuse the files a cheap scan found broken (zero bytes, not an image file)."""
    if not bad_files:
        return
    # data.on_bad_file (skip | error) comes with the run-time handling of undecodable files;
    # until a config has it, broken files are refused here, as decoding them would fail.
    if getattr(cfg.data, "on_bad_file", "error") != "error":
        log.warning("data.root=%s: %d broken files (zero bytes or not images) will be skipped",
                    cfg.data.root, len(bad_files))
        return
    path, reason = bad_files[0]
    root = Path(str(cfg.data.root)).expanduser()
    shown = os.path.relpath(path, root) if Path(path).is_relative_to(root) else path
    k = len(bad_files) - 1
    more = f" (and {k} more broken file{'s' if k > 1 else ''})" if k else ""
    fix = "remove or replace it" if reason == "zero bytes" else \
        "convert it to .jpg/.png or move it out of the class folder"
    raise ConfigError(f"data.root={cfg.data.root}: {shown} is {reason}{more}; {fix}")


def rebuild_memory(cfg: ExperimentConfig, num_samples: int) -> RebuildMemory:
    """Peak memory of one hierarchy rebuild in the prototype actor for this experiment."""
    return rebuild_estimate(num_samples, feature_dim(cfg), cfg.hirl.num_clusters,
                            num_shards=cfg.train.num_workers)


def feature_dim(cfg: ExperimentConfig) -> int:
    """Width of the clustered features (``hirl.embedding``), from a weightless (meta) build."""
    with torch.device("meta"):
        return build_method(cfg).embedding_dim(cfg.hirl.embedding)


def check_resumable(cfg: ExperimentConfig, old: dict[str, Any], source: str) -> None:
    """Refuse (one line naming the key) when ``old``, the config a run folder was trained
    with, differs from ``cfg`` in a key that changes the network or the hierarchy's shape."""
    new = cfg.to_dict()
    method_keys = tuple(("method", k) for k in cfg.method.shape_keys)
    for section, key in (*RESUME_KEYS, *method_keys):
        a, b = (old.get(section) or {}).get(key), new[section][key]
        if a != b:
            depth = ""
            if (section, key) == ("hirl", "num_clusters") and a is not None \
                    and len(a) != len(b):
                depth = f" (hierarchy depth {len(b)} vs {len(a)})"
            raise ConfigError(
                f"{section}.{key}={b!r} differs from {a!r} used by {source}{depth}; set "
                "storage.name to a new folder to start a new run, or resume with the run's "
                "own values")


def prepare_run(cfg: ExperimentConfig,
                newest_checkpoint: Callable[[str], tuple[str, dict[str, Any]] | None]
                | None = None) -> str:
    """Check the run folder (local or remote) is writable and compatible; save the config.

    Refuses to resume a run trained with an incompatible config (checked against the saved
    ``config.yaml`` and the newest checkpoint's config), before touching it or starting Ray.
    The saved ``config.yaml`` has secrets redacted. Returns the resolved run folder.

    Args:
        cfg: The experiment.
        newest_checkpoint: ``run_dir -> (path, config)`` of its newest checkpoint, or ``None``
            (:func:`hirl_ray.train.checkpoint.newest_checkpoint_config`; passed in because the
            checkpoint module builds on this one).
    """
    run_dir = storage.resolve(cfg.run_dir)
    saved = LAYOUT.config_file(run_dir)
    if storage.exists(saved):
        old = yaml.safe_load(storage.read_text(saved)) or {}
        check_resumable(cfg, old, f"the existing run in {run_dir}")
    else:
        try:
            storage.check_writable(run_dir)
        except PermissionError as e:
            raise ConfigError(str(e)) from None
    newest = newest_checkpoint(run_dir) if newest_checkpoint is not None else None
    if newest is not None:  # also when config.yaml is gone, or a checkpoint came from elsewhere
        check_resumable(cfg, newest[1], f"the checkpoint {newest[0]}")
    storage.write_text(saved, yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False))
    return run_dir
