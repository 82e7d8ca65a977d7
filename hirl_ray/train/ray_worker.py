"""The Ray Train worker function: plain PyTorch with a few marked Ray touch-points.

:func:`train_worker` reads top to bottom like Ray's ``torch_fashion_mnist_example.py``: the
``# Ray N:`` comments mark the places Ray is involved. Each named step is a small function:
the Ray-free ones (data, model + optimiser, one epoch, metrics, online evaluation) in
:mod:`hirl_ray.train.steps`, the ones that touch Ray (restore, DDP, hierarchy client and
rebuilds, checkpoint + report) below.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from hirl_ray import storage
from hirl_ray.config import ExperimentConfig, from_dict
from hirl_ray.data import build_dataset
from hirl_ray.eval.features import eval_mode, extract_features
from hirl_ray.eval.plots import prototype_tree_figure
from hirl_ray.hierarchy import PrototypeHierarchy
from hirl_ray.hierarchy.actor import get_actor
from hirl_ray.logs import console, get_logger, redact_text
from hirl_ray.methods.distributed import broadcast_buffers, ddp_kwargs
from hirl_ray.methods.hirl import HirlModel
from hirl_ray.runs import LAYOUT
from hirl_ray.train.checkpoint import (
    CheckpointMeta,
    checkpoint_dir_name,
    find_checkpoints,
    load_state,
    read_meta,
    save_checkpoint,
)
from hirl_ray.train.interrupt import run_epochs
from hirl_ray.train.loop import EpochStats, StaticHierarchy, format_epoch, is_rebuild_epoch, unwrap
from hirl_ray.train.numerics import NonFiniteError
from hirl_ray.train.observe import Board, RunObserver, hierarchy_state
from hirl_ray.train.ray_compat import quiet_train_report_logger
from hirl_ray.train.ray_data import ShardLoader
from hirl_ray.train.ray_hierarchy import HierarchyClient, dist_agree
from hirl_ray.train.ray_metrics import TrainMetrics
from hirl_ray.train.ray_stop import stop_poll
from hirl_ray.train.resume import ResumePlan, agree_on_resume
from hirl_ray.train.retention import before_report
from hirl_ray.train.steps import (
    WorkerRun,
    build_feature_loader,
    build_parts,
    build_train_loader,
    epoch_metrics,
    import_modules,
    is_eval_epoch,
    online_eval,
    online_eval_inputs,
    registering_modules,
    train_one_epoch,
    train_views,
)
from hirl_ray.train.tensorboard import TensorBoardLog

log = get_logger(__name__)


def train_worker(worker_cfg: dict[str, Any]) -> None:
    """Train one DDP rank; rank 0 logs progress and writes checkpoints."""
    console()
    quiet_train_report_logger()
    import_modules(worker_cfg.get("modules", ()))  # user-registered methods before parsing
    cfg = from_dict(worker_cfg["config"])
    ctx = ray.train.get_context()  # Ray 1: this worker's place in the group
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed + rank)

    ray_data = cfg.data.loader == "ray_data"
    # ray_data: the driver's copy of the split (an s3:// folder listed, not downloaded).
    train_set = ray.get(worker_cfg["train_source"][0]) if ray_data \
        else build_dataset(cfg.data, "train")
    run = build_parts(cfg, rank, world, device)  # HirlModel, its param groups -> optimiser
    run.train_set = train_set  # counts the files data.on_bad_file=skip replaced
    if ray_data:  # Ray 2: this worker's share of the Ray Dataset, decoded elsewhere
        run.loader = ShardLoader(cfg, len(train_set), world)
    else:
        # The method's views, or (data.augment_on=gpu) decoding here and the views on the device.
        transform, run.augment = train_views(cfg, run.model.method, train_set, rank)
        run.loader = ray.train.torch.prepare_data_loader(  # Ray 2: device transfer
            build_train_loader(cfg, train_set, transform, rank, world))
    # The clustering pass reads every sample once, un-augmented, with a DataLoader on the
    # training nodes, on both paths (ray_data: straight from S3, no local copy).
    run.feature_loader = ray.train.torch.prepare_data_loader(
        build_feature_loader(cfg, train_set, world), move_to_device=False)
    actor = get_actor(worker_cfg["actor_name"]) if cfg.hirl.enabled else None  # Ray 3: actor
    plan = restore(run, worker_cfg["run_dir"], actor)  # Ray 4: checkpoint after a failure
    run.ddp = prepare_ddp(run.model)  # Ray 5: DDP
    run.hierarchy = hierarchy_source(run, actor, plan)
    if rank == 0:  # Ray 6: progress, TensorBoard, Ray metrics, status.json
        run.observer = make_observer(run, worker_cfg)
    first_rebuild(run, plan)

    step, eval_inputs = plan.step, None

    def one_epoch(epoch: int) -> None:
        nonlocal step, eval_inputs
        stats, step = train_one_epoch(run, epoch, step)
        if is_rebuild_epoch(epoch + 1, cfg.hirl, cfg.train.epochs):
            rebuild(run, epoch + 1)
        metrics = epoch_metrics(run, stats, plan.attempt)
        if rank == 0 and is_eval_epoch(epoch + 1, cfg):
            # Rank 0 alone, between steps; the others wait in report() below.
            eval_inputs = eval_inputs or online_eval_inputs(cfg, train_set)
            metrics.update(online_eval(run, eval_inputs))
        # Ray 7: every rank reports, rank 0 checkpoints
        checkpoint = report(run, stats, step, metrics, worker_cfg["run_dir"])
        if run.observer is not None:
            observe_epoch(run, actor, stats, step, metrics, checkpoint)

    # Ray 8: SIGINT/SIGTERM on the driver stops every rank after the epoch's checkpoint.
    stop = stop_poll(worker_cfg.get("stop_flag"), rank, dist_agree(device))
    ended = "failed"
    try:
        done = run_epochs(plan.epoch, cfg.train.epochs, one_epoch, stop)
        ended = "finished" if done >= cfg.train.epochs else "stopped"
    except NonFiniteError as e:
        # Every rank raises it at the same step (the counters are agreed), so every rank can
        # return: a worker error would make Ray retry (train.max_failures) into the same NaN.
        if rank == 0:
            storage.write_text(LAYOUT.stopped_file(worker_cfg["run_dir"]),
                               json.dumps({"error": type(e).__name__, "message": e.summary}))
        return
    finally:
        if run.observer is not None:
            run.observer.close(ended)
    if rank == 0 and done < cfg.train.epochs:
        log.info("stopping after epoch %d/%d as asked; its checkpoint is saved", done,
                 cfg.train.epochs)


# ---- what the driver sends: the config plus the modules that register its names -----------

def worker_config(cfg: ExperimentConfig, actor_name: str, run_dir: str,
                  stop_flag: str | None = None, train_source: Any = None) -> dict[str, Any]:
    """``train_loop_config`` of the TorchTrainer running :func:`train_worker`.

    ``stop_flag``: the named actor the driver sets on SIGINT/SIGTERM (``None``: none).
    ``train_source``: with ``data.loader=ray_data``, the object ref of the training split the
    driver built (:func:`~hirl_ray.train.ray_data.train_source`).
    """
    return {"config": cfg.to_dict(), "modules": registering_modules(cfg),
            "actor_name": actor_name, "run_dir": run_dir, "stop_flag": stop_flag,
            # The driver's WANDB_MODE (what check_wandb checked): rank 0 may run on a node
            # without it, and an air-gapped cluster must not try to go online there.
            "wandb_mode": os.environ.get("WANDB_MODE") if cfg.observe.wandb else None,
            # In a list: a ref nested in the config is passed on, not resolved.
            "train_source": [train_source]}


# ---- watching the run (rank 0) -------------------------------------------------------------

#: Rank 0 keeps this many of its clustering features to draw the prototype tree with.
TREE_SAMPLES = 2048


def make_observer(run: WorkerRun, worker_cfg: dict[str, Any]) -> RunObserver:
    """Rank 0's progress display, TensorBoard log, MLflow and W&B runs, Ray metrics and status."""
    cfg = run.cfg
    # Plain lines, which Ray forwards to the driver's console: a worker's stdout is never a
    # terminal, and Ray's tqdm_ray bar did not reach the driver from a Train V2 worker (tried).
    boards: list[Board] = []
    if cfg.observe.tensorboard:
        boards.append(TensorBoardLog(worker_cfg["run_dir"]))
    # Optional trackers, checked on the driver before Ray; a server or key gone since costs
    # a warning, never the run.
    if cfg.observe.mlflow:
        from hirl_ray.train.mlflow_log import MlflowLog  # the optional mlflow package

        _add_board(boards, "MLflow", lambda: MlflowLog(cfg, worker_cfg["run_dir"]))
    if cfg.observe.wandb:
        from hirl_ray.train.wandb_log import WandbLog  # the optional wandb package

        _add_board(boards, "W&B", lambda: WandbLog(cfg, worker_cfg["run_dir"],
                                                   mode=worker_cfg.get("wandb_mode")))
    sink = TrainMetrics(cfg.storage.name) if cfg.observe.ray_metrics else None
    return RunObserver(cfg, worker_cfg["run_dir"], world=run.world, sink=sink,
                       boards=boards,
                       hierarchy=lambda: hierarchy_state(run.hierarchy, cfg.hirl.enabled))


def _add_board(boards: list[Board], name: str, make: Callable[[], Board]) -> None:
    try:
        boards.append(make())
    except Exception as e:  # noqa: BLE001 - a tracker never stops the run
        log.warning("%s: no run for this fit (%s: %s)", name, type(e).__name__,
                    redact_text(str(e))[:200])


def observe_epoch(run: WorkerRun, actor: Any, stats: EpochStats, step: int,
                  metrics: dict[str, Any], checkpoint: str) -> None:
    """Hand the epoch to the observer with the actor's last rebuild telemetry."""
    rebuild = None
    if actor is not None:
        try:  # a small answer; the async actor replies during a rebuild too
            rebuild = ray.get(actor.status.remote(), timeout=30)["last_rebuild"]
        except (ray.exceptions.RayError, TimeoutError) as e:
            log.debug("no rebuild telemetry from the prototype actor: %s", e)
    current = run.hierarchy.current if run.hierarchy is not None else None
    run.observer.end_epoch(stats, step, metrics, hierarchy=current, rebuild=rebuild,
                           checkpoint=checkpoint, tree=tree_drawer(run))


def tree_drawer(run: WorkerRun) -> Any:
    """Draws a hierarchy with rank 0's kept clustering features (``None`` before any)."""
    sample = run.tree_sample
    if sample is None:
        return None
    feats, idx = sample
    size = max(32, min(run.cfg.data.image_size, 64))

    def image_of(i: int) -> Any:
        image = run.train_set.image(i)
        return image.convert("RGB").resize((size, size)) if hasattr(image, "convert") else image

    def draw(h: PrototypeHierarchy) -> Any:
        return prototype_tree_figure(h.to("cpu"), feats, idx.numpy(), image_of,
                                     f"Prototype tree, hierarchy v{h.version}")

    return draw


# ---- restore and DDP ------------------------------------------------------------------------

def restore(run: WorkerRun, run_dir: str, actor: Any) -> ResumePlan:
    """Load the checkpoint every rank agreed on (if any) and return where training resumes.

    Rank 0 picks the checkpoint (the newest loadable one, at least Ray's registered one)
    and the hierarchy version; every rank loads that choice (:mod:`hirl_ray.train.resume`).
    """

    def registered() -> tuple[dict, CheckpointMeta] | None:
        checkpoint = ray.train.get_checkpoint()  # restart after a failure
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_state(d), read_meta(d)

    def version_of_round(attempt: int, round_id: int) -> int | None:
        if actor is None:
            return None
        return ray.get(actor.version_of_round.remote(attempt, round_id), timeout=120)

    state, plan = agree_on_resume(run.rank, run.device, lambda: find_checkpoints(run_dir),
                                  registered, version_of_round)
    if state is not None:
        run.model.load_state_dict(state["model"])
        try:
            run.optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:  # e.g. a checkpoint from before per-method parameter groups
            raise RuntimeError(
                f"the checkpoint in {run_dir} holds optimiser state for other parameter groups "
                f"({e}); it was written by an older hirl_ray or another method: set "
                "storage.name to a new folder to start a new run") from None
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
    if run.rank == 0 and plan.epoch:
        log.info("resumed at epoch %d (step %d, hierarchy v%d)", plan.epoch, plan.step,
                 plan.version)
    return plan


def prepare_ddp(model: HirlModel) -> nn.Module:
    """DDP without per-forward buffer broadcast.

    It would overwrite every rank's MoCo queue with rank 0's; the queues agree anyway since
    keys are gathered (:func:`~hirl_ray.methods.distributed.ddp_kwargs`).
    """
    kwargs = ddp_kwargs()
    ddp = ray.train.torch.prepare_model(model, move_to_device=False,
                                        parallel_strategy_kwargs=kwargs)
    if "broadcast_buffers" in kwargs:  # older torch: buffers not synced at DDP init either
        broadcast_buffers(unwrap(ddp))
    return ddp


# ---- hierarchy: client and rebuild schedule -------------------------------------------------

def hierarchy_source(run: WorkerRun, actor: Any, plan: ResumePlan
                     ) -> HierarchyClient | StaticHierarchy:
    """The prototype actor's client at the plan's version, or no hierarchy without HIRL."""
    if actor is None:
        return StaticHierarchy(None)
    client = HierarchyClient(actor, run.device, rank=run.rank, world_size=run.world,
                             attempt=plan.attempt, agree=dist_agree(run.device))
    client.load(plan.version)
    return client


def rebuild(run: WorkerRun, completed: int) -> None:
    """Send this rank's clustering features for round ``completed``; wait unless async."""
    assert isinstance(run.hierarchy, HierarchyClient)
    model = unwrap(run.ddp)
    with eval_mode(model):
        feats, idx = extract_features(model.cluster_embed, run.feature_loader, run.device,
                                      amp=run.use_amp)  # hirl.embedding, target network
    if run.observer is not None:  # for the prototype tree picture (TensorBoard)
        run.tree_sample = (feats[:TREE_SAMPLES].float().cpu(), idx[:TREE_SAMPLES].cpu())
    run.hierarchy.submit(completed, idx, feats)
    if not run.cfg.hirl.async_rebuild:
        run.hierarchy.wait()


def first_rebuild(run: WorkerRun, plan: ResumePlan) -> None:
    """Redo the round a checkpoint left pending, or build before step 0 without warm-up."""
    if not isinstance(run.hierarchy, HierarchyClient):
        return
    if plan.pending_round is not None:
        # A round was being built when the checkpoint was taken; its features came from
        # this very model, so redoing it gives the round the group lost.
        rebuild(run, plan.pending_round)
    elif plan.epoch == 0 and is_rebuild_epoch(0, run.cfg.hirl, run.cfg.train.epochs) \
            and run.hierarchy.current is None:
        rebuild(run, 0)


# ---- checkpoint and report ------------------------------------------------------------------

def report(run: WorkerRun, stats: EpochStats, step: int, metrics: dict[str, Any],
           run_dir: str) -> str:
    """Rank 0 logs the epoch and writes a checkpoint; every rank reports (a collective).

    Returns the checkpoint's folder name.

    Before reporting, rank 0 keeps the best checkpoint and prunes old hierarchy snapshots
    (``storage.*``; Ray Train deletes checkpoints beyond ``storage.keep_checkpoints``).
    """
    hierarchy = run.hierarchy.current if run.hierarchy is not None else None
    # The version the next epoch starts with (a sync rebuild may have just switched).
    next_version = hierarchy.version if hierarchy is not None else 0
    epoch = stats.epoch + 1
    name = LAYOUT.checkpoint_name(epoch)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if run.rank == 0:
            log.info(format_epoch(stats, run.cfg.train.epochs, run.world, hierarchy,
                                  metrics["hierarchy_building"], run.cfg.hirl.enabled))
            if stats.nan_skipped:
                log.warning("epoch %d: skipped %d of %d steps with a non-finite loss or "
                            "gradient (train.on_nan=skip_step)", epoch, stats.nan_skipped,
                            stats.steps)
            meta = CheckpointMeta(epoch=epoch, step=step, hierarchy_version=next_version,
                                  config=run.cfg.to_dict(), metrics=metrics)
            save_checkpoint(tmp, model_state=unwrap(run.ddp).state_dict(),
                            optimizer_state=run.optimizer.state_dict(),
                            scaler_state=run.scaler.state_dict() if run.scaler else None,
                            meta=meta)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            before_report(run_dir, meta, run.cfg.storage)
            name = checkpoint_dir_name(run_dir, epoch)  # -redoN after a damaged one
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    return name

