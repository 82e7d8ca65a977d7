"""Worker-side view of the prototype actor (a :class:`HierarchySource` for the loop).

After a rebuild round is submitted, each rank holds one pending ``wait_round`` call and
checks it with ``ray.wait(timeout=0)`` every step: no blocking call on the hot path. Ranks
switch to a new version on the same step: while a round is pending, every step runs one
small agreement (an element-wise MIN over ``[settled round, -offered version]``), and a
rank switches only when every rank has settled the round, to the newest version any rank
was offered. The agreement is injected (:func:`dist_agree` in production; a simulated
coordinator in the scale tests), so the same switching code runs in both.

Every wait is bounded: the actor answers ``pending`` after ``wait_timeout_s`` and the rank
asks again; a call lost to an actor restart is asked again (carrying the rank's shard refs,
so the restarted actor can rebuild the round); a synchronous wait gives up after
``sync_timeout_s`` and training goes on with the old hierarchy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import ray
import torch
import torch.distributed as dist

from hirl_ray.hierarchy import PrototypeHierarchy
from hirl_ray.hierarchy.actor import RoundStatus, Shard

log = logging.getLogger(__name__)

Agree = Callable[[list[int]], list[int]]
"""A collective: every rank passes a list of ints and gets the element-wise MIN."""


def dist_agree(device: torch.device) -> Agree:
    """Element-wise MIN across the process group (no-op without one)."""

    def agree(values: list[int]) -> list[int]:
        if not (dist.is_available() and dist.is_initialized()):
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        # gloo works for CPU tensors on every set-up Ray Train makes; NCCL needs the GPU.
        t = t.to(device) if dist.get_backend() == "nccl" else t
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return [int(v) for v in t.tolist()]

    return agree


class HierarchyClient:
    """Holds the current hierarchy on the rank's device and refreshes it from the actor.

    Args:
        actor: Handle of the :class:`~hirl_ray.hierarchy.actor.PrototypeActor`.
        device: Where the hierarchy's tensors live for the loss.
        rank, world_size: This rank and the group size (rounds complete at ``world_size``).
        attempt: The worker group's incarnation (the same on every rank).
        agree: The cross-rank MIN (:func:`dist_agree` in production).
        wait_timeout_s: Longest a single actor call waits before answering ``pending``.
        sync_timeout_s: Longest a synchronous :meth:`wait` blocks before giving up.
    """

    def __init__(self, actor: Any, device: torch.device, *, rank: int, world_size: int,
                 attempt: int, agree: Agree, wait_timeout_s: float = 30.0,
                 sync_timeout_s: float = 3600.0) -> None:
        self._actor, self._device = actor, device
        self.rank, self.world_size, self.attempt = rank, world_size, attempt
        self._agree = agree
        self._wait_timeout_s, self._sync_timeout_s = wait_timeout_s, sync_timeout_s
        self.current: PrototypeHierarchy | None = None
        self.switches: list[int] = []  # versions switched to (for tests and logs)
        self._shard: Shard | None = None  # newest unsettled round (its refs stay alive)
        self._min_round = 0  # first unsettled round; the same on every rank
        self._known = -1  # this rank knows rounds up to here are settled
        self._offer: tuple[int, Any] | None = None  # newest version offered: (version, ref)
        self._call: Any = None
        self._call_t = 0.0
        self._retry_at = 0.0
        self._errors = 0

    @property
    def version(self) -> int:
        return self.current.version if self.current is not None else 0

    @property
    def building(self) -> bool:
        return self._shard is not None

    @property
    def pending_round(self) -> int | None:
        """The newest submitted round not yet settled (saved in checkpoints)."""
        return self._shard.round if self._shard is not None else None

    def load(self, version: int) -> None:
        """Start from ``version`` (resume); every rank passes the same one."""
        if version > 0:
            self.current = self._fetch(version, None).to(self._device)

    def submit(self, round_id: int, indices: torch.Tensor, features: torch.Tensor) -> None:
        """Hand this rank's shard to the actor as object refs (fp16: enough for k-means)."""
        refs = (ray.put(indices.cpu().numpy()), ray.put(features.cpu().half().numpy()))
        if self._shard is None:
            self._min_round = round_id
        self._shard = Shard(self.attempt, round_id, self.rank, self.world_size, refs)
        self._issue()

    def poll(self) -> None:
        """Switch to a finished rebuild, on the same step on every rank."""
        if self._shard is None:  # the same on every rank: no collective
            return
        self._check(0.0)
        self._agree_and_switch()

    def wait(self) -> None:
        """Synchronous mode (official HIRL behaviour): block until the rebuild settles."""
        if self._shard is None:
            return
        deadline = time.monotonic() + self._sync_timeout_s
        while self._known < self._shard.round and time.monotonic() < deadline:
            self._check(min(5.0, max(0.0, deadline - time.monotonic())))
            pause = self._retry_at - time.monotonic()
            if pause > 0:  # the actor is unreachable: back off before asking again
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        if self._known < self._shard.round:
            log.error("rank %d: hierarchy round %d not built after %.0fs; training goes on "
                      "with v%d", self.rank, self._shard.round, self._sync_timeout_s,
                      self.version)
            self._known = self._shard.round
        self._agree_and_switch()

    # --- internals ---
    def _issue(self) -> None:
        assert self._shard is not None
        threshold = max(self._min_round, self._known + 1)
        self._call = self._actor.wait_round.remote(self.attempt, threshold, self._shard,
                                                   self._wait_timeout_s)
        self._call_t = time.monotonic()

    def _check(self, block_s: float) -> None:
        """Advance this rank's view of the pending rounds (local, no collective)."""
        if self._call is None:
            if time.monotonic() >= self._retry_at:
                self._issue()
            return
        ready, _ = ray.wait([self._call], timeout=block_s)
        if not ready:
            # An actor restart can leave the call queued for long; ask anew (bounded).
            if time.monotonic() - self._call_t > 2 * self._wait_timeout_s + 60.0:
                self._issue()
            return
        try:
            status: RoundStatus = ray.get(self._call)
        except ray.exceptions.RayError as e:
            self._errors += 1
            if self._errors == 1 or self._errors % 100 == 0:
                log.warning("rank %d: prototype actor call failed (%s); asking again",
                            self.rank, type(e).__name__)
            self._call, self._retry_at = None, time.monotonic() + min(10.0, 0.5 * self._errors)
            return
        self._call = None
        if status.state == "ready":
            if self._offer is None or status.version > self._offer[0]:
                self._offer = (status.version, status.ref[0])
            self._known = max(self._known, status.round)
        elif status.state == "failed":
            log.warning("rank %d: hierarchy rebuild failed (%s); keeping v%d", self.rank,
                        status.error, self.version)
            self._known = max(self._known, status.round)
        assert self._shard is not None
        if self._known < self._shard.round:
            self._issue()

    def _agree_and_switch(self) -> None:
        """The collective part: identical calls on every rank, decided by agreed values."""
        assert self._shard is not None
        offered = self._offer[0] if self._offer is not None else self.version
        settled, neg_newest = self._agree([self._known, -offered])
        if settled < self._min_round:
            return
        target = -neg_newest
        if target > self.version:
            own = self._offer[1] if self._offer is not None and self._offer[0] == target else None
            try:
                h: PrototypeHierarchy | None = self._fetch(target, own).to(self._device)
            except Exception as e:  # noqa: BLE001 - agreed below: all switch or none
                log.warning("rank %d: could not fetch hierarchy v%d: %s", self.rank, target, e)
                h = None
            if self._agree([1 if h is not None else 0])[0] == 1:
                self.current = h
                self.switches.append(target)
                log.debug("switched to hierarchy v%d", target)
            else:
                log.warning("hierarchy v%d not fetched on every rank; keeping v%d", target,
                            self.version)
        self._min_round = settled + 1
        if self._offer is not None and self._offer[0] <= self.version:
            self._offer = None
        if settled >= self._shard.round:
            self._shard, self._call, self._offer = None, None, None

    def _fetch(self, version: int, ref: Any, tries: int = 3) -> PrototypeHierarchy:
        """The hierarchy behind ``ref``; if its owner (the actor) died, ask the actor again."""
        error: Exception | None = None
        for _ in range(tries):
            try:
                if ref is None:
                    refs = ray.get(self._actor.get_ref.remote(version),
                                   timeout=self._wait_timeout_s + 60.0)
                    ref = refs[0]
                h = ray.get(ref, timeout=self._wait_timeout_s + 600.0)
                if h.version != version:
                    raise RuntimeError(f"asked for hierarchy v{version}, got v{h.version}")
                return h
            except (ray.exceptions.RayError, TimeoutError) as e:
                error, ref = e, None
        raise RuntimeError(f"hierarchy v{version} unavailable after {tries} tries: {error}")
