"""The stop flag: the driver sets it on SIGINT/SIGTERM, rank 0 reads it after each epoch.

See :mod:`hirl_ray.train.interrupt` for the policy. One tiny named actor per fit (no CPU);
reading it once per epoch on rank 0 and agreeing with one all-reduce keeps the hot path free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from hirl_ray.hierarchy.actor import NAMESPACE
from hirl_ray.logs import get_logger
from hirl_ray.train.ray_hierarchy import Agree

log = get_logger(__name__)


class StopFlag:
    """Holds the first stop signal's number (``None``: keep training)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum

    def get(self) -> int | None:
        return self.signum


def start_stop_flag(name: str) -> Any:
    """Create the fit's named stop flag (on the driver)."""
    return ray.remote(StopFlag).options(  # type: ignore[attr-defined]
        name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=-1).remote()


def stop_poll(name: str | None, rank: int, agree: Agree,
              timeout_s: float = 30.0) -> Callable[[], bool]:
    """``requested()`` for :func:`~hirl_ray.train.interrupt.run_epochs`: rank 0 reads the flag,
    every rank gets the same answer (a collective; ``name`` is the same on every rank)."""
    if name is None:  # e.g. a sweep trial: Tune handles interruptions
        return lambda: False
    handle = ray.get_actor(name, namespace=NAMESPACE) if rank == 0 else None

    def requested() -> bool:
        asked = 0
        if handle is not None:
            try:
                asked = int(ray.get(handle.get.remote(), timeout=timeout_s) is not None)
            except Exception as e:  # noqa: BLE001 - an unreachable flag means go on
                log.warning("could not read the stop flag (%s); training goes on", e)
        return agree([1 - asked])[0] == 0

    return requested
