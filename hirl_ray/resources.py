"""What a run asks Ray for, and whether the Ray it will use can ever give it. No Ray here.

A local Ray (started by hirl_ray) offers this machine's CPUs and GPUs and nothing else, so a
request above them is refused before Ray starts (:func:`check_local_resources`). A Ray we were
given (:func:`ray_given`: ``RAY_ADDRESS``, or the caller's own ``ray.init``) may be a cluster
whose autoscaler adds nodes: there the driver asks for :func:`resource_bundles` and waits at
most ``train.resource_timeout_s`` (``hirl_ray/train/ray_fit.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import torch

from hirl_ray.config import ConfigError, ExperimentConfig


def ray_given() -> bool:
    """Whether fit/tune use a Ray they were given instead of starting a local one.

    Given: ``RAY_ADDRESS`` is set, or this process already called ``ray.init`` (asked without
    importing Ray: only the Ray glue imports it).
    """
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def resource_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """What a fit reserves at once: one bundle per Ray Train worker, then the prototype
    actor's (when it reserves anything), then, with ``data.loader=ray_data``, one decode
    actor's (Ray Data needs at least one, beside the workers, or the workers wait for ever)."""
    t = cfg.train
    worker = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    bundles = [dict(worker) for _ in range(t.num_workers)]
    h = cfg.hirl
    actor = {k: v for k, v in (("CPU", h.actor_num_cpus), ("GPU", h.actor_num_gpus)) if v > 0}
    decode = [{"CPU": cfg.data.ray_data_cpus}] if cfg.data.loader == "ray_data" else []
    return bundles + ([actor] if h.enabled and actor else []) + decode


#: Config keys named in :func:`check_local_resources`' message, for a fit.
TRAIN_RESOURCE_KEYS = {"workers": "train.num_workers", "cpus": "train.cpus_per_worker",
                       "gpus": "train.gpus_per_worker", "no_gpu": "train.use_gpu=false"}


def local_gpu_count() -> int:
    """GPUs CUDA shows this process (what a local Ray would offer)."""
    return torch.cuda.device_count()


def check_local_resources(cfg: ExperimentConfig,
                          keys: Mapping[str, str] = TRAIN_RESOURCE_KEYS) -> None:
    """Refuse a request this machine can never meet, when hirl_ray would start a local Ray.

    A local Ray offers this machine's CPUs and GPUs and nothing else: a request above them
    waits for ever (Ray: "No available node types can fulfill resource request"). On a
    cluster we were given (:func:`ray_given`) an autoscaler may still add nodes, so there
    ``train.resource_timeout_s`` bounds the wait instead (``train/ray_fit.py``).
    ``keys``: the config keys to name (the sweep's ``tune.resources`` ones for a sweep).
    """
    if ray_given():
        return
    bundles = resource_bundles(cfg)
    t, h = cfg.train, cfg.hirl
    for resource, have in (("GPU", local_gpu_count()), ("CPU", os.cpu_count() or 1)):
        need = sum(b.get(resource, 0.0) for b in bundles)
        if need <= have + 1e-9:
            continue
        kind = resource.lower() + "s"
        per = {"GPU": t.gpus_per_worker if t.use_gpu else 0.0, "CPU": t.cpus_per_worker}
        actor = {"GPU": h.actor_num_gpus, "CPU": h.actor_num_cpus}[resource] if h.enabled else 0
        asked = [f"{keys['workers']}={t.num_workers} x {keys[kind]}={per[resource]:g}"] \
            if per[resource] else []
        asked += [f"hirl.actor_num_{kind}={actor:g}"] if actor else []
        if resource == "CPU" and cfg.data.loader == "ray_data":
            asked += [f"data.ray_data_cpus={cfg.data.ray_data_cpus:g}"]
        fix = f"set {keys['no_gpu']} or " if resource == "GPU" and t.use_gpu else ""
        raise ConfigError(
            f"{' + '.join(asked)} needs {need:g} {resource}{'s' if need != 1 else ''} but this "
            f"machine has {have} (local Ray would wait for ever); {fix}ask for fewer, or set "
            "RAY_ADDRESS to join a cluster")
