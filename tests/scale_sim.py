"""Simulated ranks for scale tests: many ranks as threads in a few Ray actor processes.

Each simulated rank runs the REAL :class:`~hirl_ray.train.ray_hierarchy.HierarchyClient`
against the REAL prototype actor, sending real feature shards (random fp16 arrays); only the
model is missing. The cross-rank agreement (``dist.all_reduce`` MIN in production) is a
small coordinator actor that returns the element-wise MIN of one collective call once every
rank has made it, and fails the call when ranks reach it from different steps (the
mismatched collective that would hang NCCL).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from hirl_ray.train.ray_hierarchy import HierarchyClient


@dataclass(frozen=True)
class SimSpec:
    """One simulated worker group (attempt)."""

    world: int
    attempt: int
    epochs: int
    steps_per_epoch: int
    rebuild_epochs: tuple[int, ...]  # completed-epoch counts after which a round is submitted
    sync: bool
    samples_per_rank: int = 64
    dim: int = 32
    start_epoch: int = 0
    start_version: int = 0
    pending_round: int | None = None  # resubmitted at start (a resume with a pending round)
    park_before_round: int | None = None  # ranks in park_ranks stop before this round
    park_ranks: tuple[int, ...] = ()
    settle_at_end: bool = True  # a final wait, so every submitted round settles
    # Async: an epoch goes on while a round is pending (up to this many extra steps), as when
    # an epoch outlasts k-means; `building` flips on an agreed step, so ranks stay in step.
    max_extra_steps: int = 0
    wait_timeout_s: float = 5.0
    sync_timeout_s: float = 180.0
    collective_timeout_s: float = 180.0


@dataclass
class RankResult:
    """What one simulated rank saw: the hierarchy version of each step, and its switches."""

    rank: int
    steps: list[tuple[int, int]] = field(default_factory=list)  # (global step, version)
    switches: list[int] = field(default_factory=list)
    final_version: int = 0


@ray.remote(num_cpus=0)
class Coordinator:
    """Element-wise MIN over every rank's call number ``seq`` (the simulated all-reduce)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.calls: dict[int, dict[str, Any]] = {}
        self.completed = 0

    async def reduce(self, seq: int, tag: int, values: list[int], timeout_s: float) -> list[int]:
        entry = self.calls.setdefault(seq, {"n": 0, "left": self.world, "min": None,
                                            "tags": set(), "event": asyncio.Event()})
        entry["n"] += 1
        entry["tags"].add(tag)
        entry["min"] = list(values) if entry["min"] is None else [
            min(a, b) for a, b in zip(entry["min"], values, strict=True)]
        if entry["n"] == self.world:
            entry["event"].set()
            self.completed += 1
        await asyncio.wait_for(entry["event"].wait(), timeout_s)
        entry["left"] -= 1
        if entry["left"] == 0:
            del self.calls[seq]
        if len(entry["tags"]) > 1:
            raise RuntimeError(f"collective {seq} reached from different steps: "
                               f"{sorted(entry['tags'])}")
        return entry["min"]

    async def count(self) -> int:
        return self.completed


def _run_rank(rank: int, spec: SimSpec, actor: Any, coordinator: Any,
              park: threading.Event) -> RankResult:
    out = RankResult(rank)
    state = {"seq": 0, "step": spec.start_epoch * spec.steps_per_epoch}

    def agree(values: list[int]) -> list[int]:
        state["seq"] += 1
        return ray.get(coordinator.reduce.remote(state["seq"], state["step"], values,
                                                 spec.collective_timeout_s),
                       timeout=spec.collective_timeout_s + 30)

    client = HierarchyClient(actor, torch.device("cpu"), rank=rank, world_size=spec.world,
                             attempt=spec.attempt, agree=agree,
                             wait_timeout_s=spec.wait_timeout_s,
                             sync_timeout_s=spec.sync_timeout_s)
    client.load(spec.start_version)
    rng = np.random.default_rng(rank + 1000 * (spec.attempt % 997))
    num_samples = spec.samples_per_rank * spec.world

    def submit(round_id: int) -> None:
        if round_id == spec.park_before_round and rank in spec.park_ranks:
            park.wait(timeout=600)  # the test kills this group while it is parked here
            raise RuntimeError("parked rank released")
        indices = np.arange(rank, num_samples, spec.world)
        feats = rng.standard_normal((len(indices), spec.dim)).astype(np.float16)
        client.submit(round_id, torch.from_numpy(indices), torch.from_numpy(feats))
        if spec.sync:
            client.wait()

    if spec.pending_round is not None:
        submit(spec.pending_round)
    for epoch in range(spec.start_epoch, spec.epochs):
        for i in range(spec.steps_per_epoch + spec.max_extra_steps):
            if i >= spec.steps_per_epoch and not client.building:
                break
            client.poll()
            out.steps.append((state["step"], client.version))
            state["step"] += 1
        if epoch + 1 in spec.rebuild_epochs:
            submit(epoch + 1)
    if spec.settle_at_end:
        client.wait()
    out.switches, out.final_version = list(client.switches), client.version
    return out


@ray.remote(num_cpus=0, max_concurrency=2)
class SimHost:
    """One process running many simulated ranks as threads."""

    def __init__(self) -> None:
        self.park = threading.Event()

    def run(self, ranks: list[int], spec: SimSpec, actor: Any, coordinator: Any
            ) -> list[RankResult]:
        torch.set_num_threads(1)
        with ThreadPoolExecutor(max_workers=len(ranks)) as pool:
            futures = [pool.submit(_run_rank, r, spec, actor, coordinator, self.park)
                       for r in ranks]
            return [f.result() for f in futures]

    def ping(self) -> bool:
        return True


def start_hosts(num_hosts: int = 2) -> list[Any]:
    """Host processes (each imports torch once; reuse them across groups)."""
    hosts = [SimHost.remote() for _ in range(num_hosts)]
    ray.get([h.ping.remote() for h in hosts], timeout=300)
    return hosts


def start_group(spec: SimSpec, actor: Any, hosts: list[Any]) -> tuple[list[Any], Any]:
    """Run ``spec.world`` ranks spread over ``hosts``; returns (run refs, coordinator)."""
    coordinator = Coordinator.remote(spec.world)
    ranks = np.array_split(np.arange(spec.world), len(hosts))
    runs = [h.run.remote([int(r) for r in chunk], spec, actor, coordinator)
            for h, chunk in zip(hosts, ranks, strict=True)]
    return runs, coordinator


def finish_group(runs: list[Any], coordinator: Any, timeout_s: float = 300.0
                 ) -> list[RankResult]:
    """Results of a group started with :func:`start_group`, sorted by rank."""
    try:
        results = [r for chunk in ray.get(runs, timeout=timeout_s) for r in chunk]
    finally:
        ray.kill(coordinator)
    return sorted(results, key=lambda r: r.rank)


def run_group(spec: SimSpec, actor: Any, hosts: list[Any], timeout_s: float = 300.0
              ) -> list[RankResult]:
    """Run one group to the end on ``hosts``; results sorted by rank."""
    return finish_group(*start_group(spec, actor, hosts), timeout_s=timeout_s)
