"""Driver side of a fit: start Ray and the prototype actor, run the TorchTrainer,
evaluate the final checkpoint. Called by :func:`hirl_ray.fit` after validation."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from hirl_ray import status as run_status
from hirl_ray import storage
from hirl_ray.config import ConfigError, ExperimentConfig, RunStopped
from hirl_ray.eval.checkpoint import evaluate_checkpoint
from hirl_ray.hierarchy.actor import ActorSettings, actor_name, start_actor
from hirl_ray.hierarchy.memory import (
    RebuildMemory,
    check_rebuild_memory,
    node_memory_bytes,
)
from hirl_ray.hierarchy.snapshot import latest_snapshot
from hirl_ray.logs import get_logger, redact
from hirl_ray.resources import ray_given, resource_bundles
from hirl_ray.runs import LAYOUT, FitResult
from hirl_ray.train.checkpoint import latest_good_checkpoint, read_meta
from hirl_ray.train.interrupt import Interrupted, StopRequest, run_in_thread
from hirl_ray.train.numerics import NonFiniteError
from hirl_ray.train.ray_cluster import connect
from hirl_ray.train.ray_data import train_datasets, train_source
from hirl_ray.train.ray_stop import start_stop_flag
from hirl_ray.train.ray_worker import train_worker, worker_config
from hirl_ray.train.steps import call_with_modules, registering_modules

log = get_logger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS``'s cluster if set, else start a local Ray (once per process); by
    address either way (``train/ray_cluster.py``)."""
    connect(num_cpus=num_cpus, dashboard=os.environ.get("HIRL_RAY_DASHBOARD", "1") == "1")


def describe_bundles(bundles: Sequence[dict[str, float]]) -> str:
    """``"2 x {CPU: 1, GPU: 1} + {CPU: 2}"``: what a placement of ``bundles`` asks for."""
    groups: dict[str, int] = {}
    for b in bundles:
        text = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(b.items())) + "}"
        groups[text] = groups.get(text, 0) + 1
    return " + ".join(f"{n} x {text}" if n > 1 else text for text, n in groups.items())


def wait_for_resources(bundles: Sequence[dict[str, float]], timeout_s: float) -> None:
    """Wait until the cluster can place ``bundles`` at once (an autoscaler may be adding
    nodes), or give up after ``timeout_s`` (0: wait for ever) with a one-line ConfigError
    saying what was asked and what the cluster has.

    Ray Train itself would wait for ever ("No available node types can fulfill resource
    request"); this asks with a placement group of the same bundles first and frees it.
    """
    pg = ray.util.placement_group(list(bundles), strategy="PACK")
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s if timeout_s > 0 else None)
        if not ready:
            have = {k: v for k, v in sorted(ray.cluster_resources().items())
                    if k in ("CPU", "GPU")}
            raise ConfigError(
                f"train.resource_timeout_s: waited {timeout_s:g}s for {describe_bundles(bundles)}"
                f" (train workers, prototype actor); the cluster has {have or 'nothing'}; add "
                "nodes of that kind, ask for less, or raise train.resource_timeout_s")
    finally:
        ray.util.remove_placement_group(pg)


def _node_of_this_process(_actor: Any = None) -> tuple[str, int | None]:
    """Name and memory of the node running this code (sent into the actor by ``__ray_call__``)."""
    return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})", node_memory_bytes()


def check_actor_node_memory(actor: Any, need: RebuildMemory, timeout_s: float = 120.0) -> None:
    """Compare the rebuild estimate with the memory of the node the prototype actor landed on.

    Joining a cluster, the driver cannot know that node before Ray places the actor. Warns with
    the node's name, or raises ``ConfigError`` before training when the rebuild cannot fit. An
    actor not placed within ``timeout_s`` (the autoscaler still starting its node) is not
    waited for: training starts, with a line saying the check was skipped.
    """
    ref = actor.__ray_call__.remote(_node_of_this_process)
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        log.warning("the prototype actor was not placed within %.0fs; not checking its node's "
                    "memory (a rebuild needs about %s)", timeout_s, need.describe())
        return
    node, available = ray.get(ref)
    warning = check_rebuild_memory(need, available, f"node {node}")
    if warning:
        log.warning(warning)


def train_on_ray(cfg: ExperimentConfig, run_dir: str, num_samples: int,
                 callbacks: Sequence[Any] = (), rebuild_memory: RebuildMemory | None = None,
                 stop_flag: str | None = None) -> None:
    """Start the prototype actor and fit a TorchTrainer into the run's ``train/`` folder.

    Resumes from ``run_dir``'s newest good checkpoint. ``callbacks`` go to Ray Train's
    ``RunConfig`` (Tune passes its report callback here). ``rebuild_memory``: when joining a
    cluster (``RAY_ADDRESS``), checked against the actor's node before training starts (a
    local Ray's machine was checked before Ray started). ``stop_flag``: the named
    :class:`~hirl_ray.train.ray_stop.StopFlag` the workers read after each epoch.
    """
    resume = latest_good_checkpoint(run_dir)
    done_epochs = read_meta(resume).epoch if resume is not None else 0
    if done_epochs >= cfg.train.epochs:
        return
    if resume is not None:
        log.info("resuming from %s (%d/%d epochs)", resume, done_epochs, cfg.train.epochs)
    name = actor_name(f"{cfg.storage.name}-{os.getpid()}-{time.time_ns()}")
    actor = None
    if cfg.hirl.enabled:
        actor = start_actor(name, ActorSettings(
            snapshot_dir=LAYOUT.hierarchy_dir(run_dir), num_clusters=cfg.hirl.num_clusters,
            num_samples=num_samples, seed=cfg.train.seed, niter=cfg.hirl.kmeans_iters,
            nredo=cfg.hirl.kmeans_nredo, max_points_per_centroid=cfg.hirl.max_points_per_centroid,
            use_gpu=None if cfg.hirl.actor_num_gpus > 0 else False,
            kmeans_init=cfg.hirl.kmeans_init, run_name=cfg.storage.name,
            ray_metrics=cfg.observe.ray_metrics),
            num_cpus=cfg.hirl.actor_num_cpus, num_gpus=cfg.hirl.actor_num_gpus)
    gpus = {"GPU": cfg.train.gpus_per_worker} if cfg.train.use_gpu else {}
    datasets, source_ref = None, None
    if cfg.data.loader == "ray_data":
        # One copy in the object store for the decode actors and the workers (the features
        # pass, online evaluation); the Dataset streams the shuffled views to the workers.
        source = train_source(cfg)
        source_ref = ray.put(source)
        datasets = train_datasets(cfg, source_ref, len(source))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_config(cfg, name, run_dir, stop_flag, source_ref),
        datasets=datasets,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **gpus}),
        run_config=ray.train.RunConfig(
            name=LAYOUT.train, storage_path=str(run_dir), callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # storage.keep_checkpoints: Ray deletes older ones (always keeping the newest) and
            # keeps its run snapshot consistent; the best one is copied aside first
            # (hirl_ray.train.retention).
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.storage.keep_checkpoints),
            # Keep Ray Train's per-report INFO lines off the console; our one line per
            # epoch says what matters.
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    stopped_file = LAYOUT.stopped_file(run_dir)
    storage.delete_file(stopped_file)  # a stop of an earlier attempt (the user has fixed it since)
    try:
        if actor is not None:
            _say_actor_faiss(actor)
        if actor is not None and rebuild_memory is not None and os.environ.get("RAY_ADDRESS"):
            check_actor_node_memory(actor, rebuild_memory)
        trainer.fit()
        if storage.exists(stopped_file):  # train.on_nan: the workers stopped, nothing to retry
            raise NonFiniteError(json.loads(storage.read_text(stopped_file))["message"])
    except ray.train.TrainingFailedError as e:
        stopped = policy_stop(e)
        if stopped is None:
            raise
        raise stopped from None  # one line (train.on_nan, data.on_bad_file), not Ray's pages
    finally:
        if actor is not None:
            ray.kill(actor)


def policy_stop(error: BaseException) -> RunStopped | None:
    """The :class:`~hirl_ray.config.RunStopped` a worker raised inside Ray's failure, if any.

    Ray Train wraps a worker's exception (``worker_failures``, each a
    ``UserExceptionWithTraceback`` holding the original); a DataLoader worker's arrives
    re-raised with its traceback in the message (:attr:`RunStopped.summary` is its last line).
    """
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RunStopped):
            return type(e)(e.summary)
        todo += [getattr(e, "_base_exc", None), e.__cause__, e.__context__,
                 *getattr(e, "worker_failures", {}).values()]
    return None


def _say_actor_faiss(actor: Any, timeout_s: float = 30.0) -> None:
    """Log which faiss build the prototype actor's node runs (faiss-cpu vs faiss-gpu)."""
    try:
        where = ray.get(actor.status.remote(), timeout=timeout_s)["faiss"]
    except ray.exceptions.GetTimeoutError:  # e.g. an autoscaler still starting its node
        log.info("prototype actor not placed within %.0fs; training starts and waits for it "
                 "at the first rebuild", timeout_s)
        return
    log.info("prototype actor k-means: %s", where)


def final_evaluation(cfg: ExperimentConfig, run_dir: str) -> FitResult:
    """Evaluate the newest good checkpoint in a Ray task (on a GPU when training used one).

    The task gets the run's config as loaded (the checkpoint's copy has secrets redacted, e.g.
    credentials in a ``data.root`` URI).
    """
    final = latest_good_checkpoint(run_dir)
    if final is None:
        raise RuntimeError("training finished without a checkpoint under "
                           f"{LAYOUT.train_dir(run_dir)}")
    hierarchy_dir = LAYOUT.hierarchy_dir(run_dir)
    remote_eval = ray.remote(call_with_modules).options(
        num_cpus=1, num_gpus=1 if cfg.train.use_gpu else 0)
    device = "cuda" if cfg.train.use_gpu else "cpu"
    # The task parses the checkpoint's config: import the modules registering its method first.
    metrics = ray.get(remote_eval.remote(registering_modules(cfg), evaluate_checkpoint, final,
                                         hierarchy_dir, device, cfg.to_dict()))
    metrics = final_metrics(read_meta(final).metrics, metrics)
    storage.write_text(LAYOUT.metrics_file(run_dir),
                       json.dumps(redact(metrics), indent=2, default=float))
    snapshot = latest_snapshot(hierarchy_dir)
    return FitResult(metrics=metrics, checkpoint_path=str(final),
                     hierarchy_path=snapshot, run_dir=run_dir)


def final_metrics(trained: dict[str, Any], evaluated: dict[str, Any]) -> dict[str, Any]:
    """``metrics.json``: the last epoch's metrics as ``train/…``, the count of skipped files
    (``data.on_bad_file=skip``, all ranks) as ``data/bad_files_skipped``, then the evaluation."""
    trained = dict(trained)
    skipped = trained.pop("bad_files_skipped", 0)  # 0 in checkpoints from before the count
    return {**{f"train/{k}": v for k, v in trained.items()},
            "data/bad_files_skipped": skipped, **evaluated}


def run_fit(cfg: ExperimentConfig, run_dir: str, num_samples: int,
            rebuild_memory: RebuildMemory | None = None) -> FitResult:
    """Train (resuming from ``run_dir``'s newest checkpoint if any) and evaluate.

    SIGINT/SIGTERM stop training after the current epoch's checkpoint
    (:mod:`hirl_ray.train.interrupt`) and raise :class:`Interrupted` before the evaluation.
    """
    given = ray_given()  # before init_ray: after it, Ray is always initialized
    init_ray()
    log.info("watch it: hirl-ray status %s%s", run_dir,
             f" | tensorboard --logdir {LAYOUT.tensorboard_dir(run_dir)}"
             if cfg.observe.tensorboard else "")
    if given:
        # A local Ray we started was checked against this machine before it started.
        wait_for_resources(resource_bundles(cfg), cfg.train.resource_timeout_s)
    flag_name = f"hirl-stop-{cfg.storage.name}-{os.getpid()}-{time.time_ns()}"
    flag = start_stop_flag(flag_name)
    try:
        with StopRequest(notify=lambda signum: ray.get(flag.set.remote(signum),
                                                       timeout=30)) as stop:
            # In a thread: Ray Train's fit() on the main thread would replace our SIGINT
            # handler with one that aborts the run without a checkpoint.
            run_in_thread(train_on_ray, cfg, run_dir, num_samples,
                          rebuild_memory=rebuild_memory, stop_flag=flag_name)
    except BaseException as e:
        first = str(e).splitlines()[0] if str(e) else ""
        _mark(run_dir, "failed", error=f"{type(e).__name__}: {first}")
        raise
    finally:
        ray.kill(flag)
    if stop.signum is not None:
        _mark(run_dir, "stopped")
        raise interrupted(cfg, run_dir, stop.signum)
    _mark(run_dir, "evaluating")
    log.info("evaluating the final checkpoint (%s)…", ", ".join(cfg.eval.protocols))
    result = final_evaluation(cfg, run_dir)
    _mark(run_dir, "finished")
    skipped = result.metrics.get("data/bad_files_skipped", 0)
    if skipped:
        log.warning("%d unreadable training image files were skipped (data.on_bad_file=skip); "
                    "the workers' 'skipping unreadable image' lines name them", skipped)
    return result


def _mark(run_dir: str, state: str, **extra: Any) -> None:
    """Set the state in the run's ``status.json`` (``hirl-ray status``); never raises."""
    try:
        run_status.mark(run_dir, state, **extra)
    except Exception as e:  # noqa: BLE001 - the status file never hides the run's own outcome
        log.warning("could not update %s: %s", LAYOUT.status_file(run_dir), e)


def interrupted(cfg: ExperimentConfig, run_dir: str, signum: int) -> Interrupted:
    """The one-line :class:`Interrupted` of a fit stopped by ``signum``."""
    last = latest_good_checkpoint(run_dir)
    epoch = read_meta(last).epoch if last is not None else 0
    name = signal.Signals(signum).name
    return Interrupted(f"stopped by {name} after epoch {epoch}/{cfg.train.epochs} (checkpoint "
                       f"{last}); run the same command again to resume", signum, epoch, last)
