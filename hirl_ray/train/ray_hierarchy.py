"""Worker-side view of the prototype actor (a :class:`HierarchySource` for the loop).

After a rebuild round is submitted, each worker holds one pending
``wait_for_version`` ref and checks it with ``ray.wait(timeout=0)`` every step — no
blocking call on the hot path. Ranks switch to a new version on the same step: a
one-integer all-reduce (MIN over "ready" flags) runs only while a rebuild is pending,
so every rank uses the same hierarchy for the same step.
"""

from __future__ import annotations

import logging

import ray
import torch
import torch.distributed as dist

from hirl_ray.hierarchy import PrototypeHierarchy
from hirl_ray.hierarchy.actor import get_actor

log = logging.getLogger(__name__)


class HierarchyClient:
    """Holds the current hierarchy on the worker's device and refreshes it."""

    def __init__(self, actor_name: str, device: torch.device, version: int = 0,
                 pending: bool = False) -> None:
        self._actor = get_actor(actor_name)
        self._device = device
        self.current: PrototypeHierarchy | None = None
        self._pending: ray.ObjectRef | None = None
        self._submitted: list[ray.ObjectRef] = []
        if version > 0:
            h = ray.get(self._actor.get.remote(version))
            self._set(h)
        if pending:  # the checkpoint was taken while a rebuild was running: pick it up
            self._pending = self._actor.wait_for_version.remote(version + 1)

    @property
    def version(self) -> int:
        return self.current.version if self.current is not None else 0

    @property
    def building(self) -> bool:
        return self._pending is not None

    def _set(self, h: PrototypeHierarchy | None) -> None:
        self.current = h.to(self._device) if h is not None else None

    def submit(self, round_id: int, indices: torch.Tensor, features: torch.Tensor) -> None:
        """Hand this rank's shard to the actor as object refs (fp16: enough for k-means)."""
        ctx = ray.train.get_context()
        refs = [ray.put(indices.cpu().numpy()), ray.put(features.cpu().half().numpy())]
        self._submitted = refs  # keep them alive until the new version arrives
        self._actor.submit_features.remote(round_id, ctx.get_world_rank(),
                                           ctx.get_world_size(), refs)
        self._pending = self._actor.wait_for_version.remote(self.version + 1)

    def wait(self) -> None:
        """Synchronous mode (official HIRL behaviour): block until the rebuild is done."""
        if self._pending is not None:
            self._set(ray.get(self._pending))
            self._pending, self._submitted = None, []

    def poll(self) -> None:
        """Switch to a finished rebuild, on the same step on every rank."""
        if self._pending is None:
            return
        ready, _ = ray.wait([self._pending], timeout=0)
        flag = torch.tensor([1 if ready else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            # gloo works for CPU tensors on every backend set-up Ray Train makes; for
            # NCCL the flag must live on the GPU.
            flag = flag.to(self._device) if dist.get_backend() == "nccl" else flag
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 1:
            self._set(ray.get(self._pending))
            self._pending, self._submitted = None, []
            log.debug("switched to hierarchy v%d", self.version)
