"""The Ray Train worker function: plain PyTorch with a few marked Ray touch-points."""

from __future__ import annotations

import logging
import sys
import tempfile
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from hirl_ray.config import ExperimentConfig, from_dict
from hirl_ray.data import ViewDataset, build_dataset, eval_transform, multi_view_transform
from hirl_ray.eval.features import eval_mode, extract_features
from hirl_ray.eval.report import evaluate
from hirl_ray.hierarchy.actor import get_actor
from hirl_ray.methods.distributed import broadcast_buffers, convert_sync_batchnorm, ddp_kwargs
from hirl_ray.methods.hirl import HirlModel
from hirl_ray.train.checkpoint import (
    CheckpointMeta,
    find_checkpoints,
    load_state,
    read_meta,
    save_checkpoint,
)
from hirl_ray.train.loop import (
    StaticHierarchy,
    build_optimizer,
    format_epoch,
    is_rebuild_epoch,
    train_epoch,
    unwrap,
)
from hirl_ray.train.ray_hierarchy import HierarchyClient, dist_agree
from hirl_ray.train.resume import ResumePlan, agree_on_resume

#: Steps between checks for a finished rebuild (each is a host-synchronising agreement).
HIERARCHY_POLL_EVERY = 8


def build_train_loader(cfg: ExperimentConfig, train_set, rank: int, world: int) -> DataLoader:
    """This rank's loader of augmented views, ``train.batch_size / world`` per step.

    The DistributedSampler is ours, seeded with ``train.seed`` so the seed changes the data
    order (``prepare_data_loader`` keeps a loader that already has one; the sampler it would
    add uses seed 0). The sampler pads to equal shares and ``drop_last`` drops a ragged last
    batch, so every rank takes the same number of equal-sized steps, which the gathers in
    the methods need. ``set_epoch`` reshuffles each epoch.
    """
    views = ViewDataset(train_set, multi_view_transform(cfg.data.image_size))
    sampler = DistributedSampler(views, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.train.seed)
    return DataLoader(views, batch_size=cfg.train.batch_size // world, sampler=sampler,
                      drop_last=True, num_workers=cfg.data.loader_workers,
                      persistent_workers=cfg.data.loader_workers > 0,
                      pin_memory=cfg.train.use_gpu)  # page-locked: async host→GPU copies


def _restore(run_dir: str, rank: int, device: torch.device, actor: Any
             ) -> tuple[dict | None, ResumePlan]:
    """Rank 0 picks the checkpoint (the newest loadable one, at least Ray's registered one)
    and the hierarchy version; every rank loads that choice (:mod:`hirl_ray.train.resume`)."""

    def registered() -> tuple[dict, CheckpointMeta] | None:
        checkpoint = ray.train.get_checkpoint()  # Ray 1: restart after a failure
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_state(d), read_meta(d)

    def version_of_round(attempt: int, round_id: int) -> int | None:
        if actor is None:
            return None
        return ray.get(actor.version_of_round.remote(attempt, round_id), timeout=120)

    return agree_on_resume(rank, device, lambda: find_checkpoints(run_dir), registered,
                           version_of_round)


def say(message: str) -> None:
    """One progress line to the driver's console.

    Ray Train V2 patches ``print`` to tee into its logger, which shows every line
    twice; writing to the real stdout shows it once.
    """
    print(message, file=sys.__stdout__ or sys.stdout, flush=True)


def _online_eval_loaders(cfg: ExperimentConfig, train_set) -> dict[str, Any]:
    """Loaders and labels for rank 0's periodic kNN/NMI (features stay on CPU)."""
    test_set = build_dataset(cfg.data, "test")
    tf = eval_transform(cfg.data.image_size)
    train_view: Any = ViewDataset(train_set, tf)
    if cfg.eval.max_train_samples and cfg.eval.max_train_samples < len(train_set):
        # A fixed, seeded subset: the same samples every epoch, comparable across trials.
        g = torch.Generator().manual_seed(cfg.train.seed)
        keep = torch.randperm(len(train_set), generator=g)[:cfg.eval.max_train_samples]
        train_view = Subset(train_view, keep.tolist())
    return {"train_loader": DataLoader(train_view, batch_size=256),
            "test_loader": DataLoader(ViewDataset(test_set, tf), batch_size=256),
            "train_labels": train_set.labels, "test_labels": test_set.labels,
            "level_names": train_set.level_names}


def is_eval_epoch(completed: int, cfg: ExperimentConfig) -> bool:
    """Periodic evaluation every ``eval.every_epochs`` (0 = only the final one, on the driver)."""
    every = cfg.eval.every_epochs
    return every > 0 and (completed % every == 0 or completed == cfg.train.epochs)


def _quiet_ray_train_reports() -> None:
    """Ray 2.60 logs every report at INFO through ``logging.getLogger(__file__)`` of its
    context module, so LoggingConfig(log_level) misses it; silence that logger only."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a later Ray moved it: nothing to silence
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(worker_cfg: dict[str, Any]) -> None:
    """Train one DDP rank; rank 0 prints progress and writes checkpoints."""
    _quiet_ray_train_reports()
    cfg = from_dict(worker_cfg["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed + rank)
    device = ray.train.torch.get_device()

    train_set = build_dataset(cfg.data, "train")
    per_worker = cfg.train.batch_size // world  # config.validate: divides evenly
    loader = build_train_loader(cfg, train_set, rank, world)
    loader = ray.train.torch.prepare_data_loader(loader)  # Ray 2: device transfer
    plain = ViewDataset(train_set, eval_transform(cfg.data.image_size))
    feature_loader = ray.train.torch.prepare_data_loader(
        DataLoader(plain, batch_size=max(per_worker, 256), shuffle=False,
                   num_workers=cfg.data.loader_workers, pin_memory=cfg.train.use_gpu),
        move_to_device=False)

    model = HirlModel.from_config(cfg)  # hirl.embedding, hirl.neg_average, heads per level
    if cfg.model.sync_bn and world > 1:
        model = convert_sync_batchnorm(model, device.type)  # before DDP; same state_dict
    model = model.to(device)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad],
                                cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay)
    use_amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    actor = get_actor(worker_cfg["actor_name"]) if cfg.hirl.enabled else None
    state, plan = _restore(worker_cfg["run_dir"], rank, device, actor)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    start_epoch, step, version = plan.epoch, plan.step, plan.version
    # Ray 3: DDP without per-forward buffer broadcast (it would overwrite every rank's MoCo
    # queue with rank 0's; the queues agree anyway since keys are gathered).
    kwargs = ddp_kwargs()
    ddp = ray.train.torch.prepare_model(model, move_to_device=False,
                                        parallel_strategy_kwargs=kwargs)
    if "broadcast_buffers" in kwargs:  # older torch: buffers not synced at DDP init either
        broadcast_buffers(unwrap(ddp))

    if actor is not None:  # Ray 4: the prototype actor
        hierarchy: HierarchyClient | StaticHierarchy = HierarchyClient(
            actor, device, rank=rank, world_size=world, attempt=plan.attempt,
            agree=dist_agree(device))
        hierarchy.load(version)
    else:
        hierarchy = StaticHierarchy(None)
    if rank == 0 and start_epoch:
        say(f"[hirl_ray] resumed at epoch {start_epoch} (step {step}, hierarchy v{version})")

    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup_steps = steps_per_epoch * cfg.train.warmup_lr_epochs
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank)

    def rebuild(completed: int) -> None:
        assert isinstance(hierarchy, HierarchyClient)
        with eval_mode(unwrap(ddp)):
            feats, idx = extract_features(unwrap(ddp).cluster_embed, feature_loader, device,
                                          amp=use_amp)  # hirl.embedding, target network
        hierarchy.submit(completed, idx, feats)
        if not cfg.hirl.async_rebuild:
            hierarchy.wait()

    if plan.pending_round is not None and isinstance(hierarchy, HierarchyClient):
        # A round was being built when the checkpoint was taken; its features came from
        # this very model, so redoing it gives the round the group lost.
        rebuild(plan.pending_round)
    elif start_epoch == 0 and is_rebuild_epoch(0, cfg.hirl, cfg.train.epochs) \
            and hierarchy.current is None:
        rebuild(0)
    eval_inputs: dict[str, Any] | None = None
    for epoch in range(start_epoch, cfg.train.epochs):
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        stats, step = train_epoch(ddp, loader, optimizer, epoch=epoch, step=step,
                                  total_steps=total_steps, base_lr=cfg.train.lr,
                                  warmup_steps=warmup_steps, hierarchy=hierarchy,
                                  device=device, scaler=scaler, generator=generator,
                                  poll_every=HIERARCHY_POLL_EVERY)
        if is_rebuild_epoch(epoch + 1, cfg.hirl, cfg.train.epochs):
            rebuild(epoch + 1)
        pending_round = hierarchy.pending_round if isinstance(hierarchy, HierarchyClient) \
            else None
        building = pending_round is not None
        # The version the next epoch starts with (a sync rebuild may have just switched).
        next_version = hierarchy.current.version if hierarchy.current is not None else 0
        metrics = {"epoch": epoch + 1, "loss": stats.loss, "ssl_loss": stats.method_loss,
                   "semantic_loss": stats.semantic_loss if stats.semantic_loss is not None
                   else float("nan"), "hirl_active": stats.semantic_steps > 0,
                   "hierarchy_version": stats.hierarchy_version, "lr": stats.lr,
                   "hierarchy_building": building,
                   # For a resume: which round to redo (-1: none) and by which attempt.
                   "hierarchy_pending_round": -1 if pending_round is None else pending_round,
                   "hierarchy_attempt": plan.attempt,
                   "samples_per_s": stats.samples_per_s * world, "epoch_s": stats.seconds}
        if rank == 0 and is_eval_epoch(epoch + 1, cfg):
            # Rank 0 alone, between steps; the others wait in report() below. Keys as in
            # the final evaluation, e.g. knn_acc/superclass.
            eval_inputs = eval_inputs or _online_eval_loaders(cfg, train_set)
            metrics.update(evaluate(unwrap(ddp).embed, device=device, k=cfg.eval.knn_k,
                                    temperature=cfg.eval.knn_temperature, seed=cfg.train.seed,
                                    **eval_inputs))
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                say(format_epoch(stats, cfg.train.epochs, world, hierarchy.current, building))
                save_checkpoint(tmp, model_state=unwrap(ddp).state_dict(),
                                optimizer_state=optimizer.state_dict(),
                                scaler_state=scaler.state_dict() if scaler else None,
                                meta=CheckpointMeta(epoch=epoch + 1, step=step,
                                                    hierarchy_version=next_version,
                                                    config=cfg.to_dict(), metrics=metrics))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            # Ray 5: every rank reports (a collective); rank 0 attaches the checkpoint.
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
