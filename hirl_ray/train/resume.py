"""Where a (re)started worker group resumes: rank 0 decides, every rank follows.

Ranks that chose their checkpoint independently could disagree after one transient storage
error (one rank falls back to an older checkpoint): different epochs, steps and hierarchy
versions mean mismatched collectives and a hang. So rank 0 alone reads storage to decide,
broadcasts a small :class:`ResumePlan`, and every rank loads exactly that checkpoint (with
retries; a rank that still cannot read it fails the group, which Ray Train restarts).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hirl_ray.logs import get_logger
from hirl_ray.train.checkpoint import (
    CheckpointMeta,
    UnsafeCheckpointError,
    load_state,
    read_meta,
)

log = get_logger(__name__)

REGISTERED = "<ray-registered>"  # plan.checkpoint: Ray's registered checkpoint (not a path)


@dataclass(frozen=True)
class ResumePlan:
    """What every rank of this worker group starts from.

    ``checkpoint``: a folder, :data:`REGISTERED`, or ``None`` (fresh start). ``version``: the
    hierarchy to train with first. ``pending_round``: a rebuild round that was running when
    the checkpoint was taken and has no version yet: redo it from this checkpoint's model.
    ``attempt``: this worker group's incarnation, fresh on every start.
    """

    checkpoint: str | None
    epoch: int
    step: int
    version: int
    pending_round: int | None
    attempt: int


def new_attempt() -> int:
    """A fresh worker-group incarnation id (positive int64)."""
    return uuid.uuid4().int & ((1 << 62) - 1)


def choose_checkpoint(candidates: Sequence[str], registered: CheckpointMeta | None,
                      load: Callable[[str], tuple[dict, CheckpointMeta]]
                      ) -> tuple[str | None, dict | None, CheckpointMeta | None]:
    """The newest loadable checkpoint newer than Ray's registered one, else the registered one.

    Ray registers a checkpoint only after every rank reported it, so its latest can lag the
    newest complete folder by an epoch or two (ray #46814), and a new driver starts with none
    (ray #45516). A folder that fails to load (upload cut short, damaged: its files do not
    match the manifest) falls back to an older one with a warning.

    Returns:
        ``(checkpoint, state, meta)`` with ``checkpoint`` a candidate, :data:`REGISTERED` or
        ``None``; ``state`` is ``None`` when the registered one was chosen (not loaded here).

    Raises:
        UnsafeCheckpointError: A checkpoint in an old format (never silently skipped).
        RuntimeError: There are checkpoints but none loads (starting over would hide it).
    """
    skipped = []
    for path in reversed(list(candidates)):
        try:
            if registered is not None and read_meta(path).epoch <= registered.epoch:
                break
            state, meta = load(path)
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated or unreadable: try an older one
            log.warning("skipping unreadable checkpoint %s (%s); falling back to the previous "
                        "one", path, e)
            skipped.append(path)
            continue
        return path, state, meta
    if registered is not None:
        return REGISTERED, None, registered
    if skipped:
        raise RuntimeError(f"none of the {len(skipped)} checkpoints loads (newest: "
                           f"{skipped[0]}); move the run's train/ folder aside to start over")
    return None, None, None


def plan_from_meta(checkpoint: str | None, meta: CheckpointMeta | None, attempt: int,
                   version_of_round: Callable[[int, int], int | None]) -> ResumePlan:
    """Turn rank 0's chosen checkpoint into the plan.

    A round pending at the checkpoint was built from that checkpoint's model; if its version
    exists (the actor kept building after the group died), start from it instead of redoing it.
    """
    if meta is None:
        return ResumePlan(None, 0, 0, 0, None, attempt)
    version = meta.hierarchy_version
    pending = meta.metrics.get("hierarchy_pending_round")
    if pending is None and meta.metrics.get("hierarchy_building"):
        pending = meta.epoch  # checkpoints older than the field: the round of this epoch
    if pending is not None and int(pending) < 0:
        pending = None
    built_by = meta.metrics.get("hierarchy_attempt")
    if pending is not None and built_by is not None:
        built = version_of_round(int(built_by), int(pending))
        if built is not None and built > version:
            version, pending = built, None
    return ResumePlan(checkpoint, meta.epoch, meta.step, version,
                      None if pending is None else int(pending), attempt)


def broadcast_plan(plan: ResumePlan | None, device: torch.device) -> ResumePlan:
    """Rank 0's plan on every rank (``plan`` is only read on rank 0)."""
    if not (dist.is_available() and dist.is_initialized()):
        assert plan is not None
        return plan
    box: list[Any] = [plan]
    dist.broadcast_object_list(box, src=0,
                               device=device if dist.get_backend() == "nccl" else None)
    return box[0]


def load_with_retries(path: str, tries: int = 5, base_delay_s: float = 1.0
                      ) -> tuple[dict, CheckpointMeta]:
    """Load the chosen checkpoint; transient storage errors are retried (then raised)."""
    for attempt in range(tries):
        try:
            return load_state(path), read_meta(path)
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - retried, then re-raised
            if attempt == tries - 1:
                raise
            log.warning("reading checkpoint %s failed (%s); retrying", path, e)
            time.sleep(base_delay_s * 2**attempt)
    raise AssertionError("unreachable")


def agree_on_resume(rank: int, device: torch.device, candidates: Callable[[], Sequence[str]],
                    registered: Callable[[], tuple[dict, CheckpointMeta] | None],
                    version_of_round: Callable[[int, int], int | None]
                    ) -> tuple[dict | None, ResumePlan]:
    """Rank 0 chooses and broadcasts; every rank returns ``(state, plan)`` of that choice.

    Args:
        rank: This rank.
        device: For the broadcast on NCCL.
        candidates: Rank 0 only: complete checkpoint folders, oldest first.
        registered: Ray's registered checkpoint as ``(state, meta)`` (or ``None``).
        version_of_round: Rank 0 only: the actor's ``version_of_round``.
    """
    plan: ResumePlan | None = None
    state: dict | None = None
    if rank == 0:
        reg = _registered_or_none(registered)
        path, state, meta = choose_checkpoint(candidates(), reg[1] if reg else None,
                                              load_with_retries_once)
        if path == REGISTERED and reg is not None:
            state = reg[0]
        plan = plan_from_meta(path, meta, new_attempt(), version_of_round)
    plan = broadcast_plan(plan, device)
    if rank != 0 and plan.checkpoint is not None:
        if plan.checkpoint == REGISTERED:
            reg = registered()
            if reg is None:
                raise RuntimeError("rank 0 resumes from Ray's registered checkpoint, which "
                                   f"rank {rank} does not see")
            state = reg[0]
        else:
            state, meta = load_with_retries(plan.checkpoint)
            if meta.epoch != plan.epoch:
                raise RuntimeError(f"{plan.checkpoint} changed while resuming: epoch "
                                   f"{meta.epoch}, rank 0 read {plan.epoch}")
    return state, plan


def _registered_or_none(registered: Callable[[], tuple[dict, CheckpointMeta] | None]
                        ) -> tuple[dict, CheckpointMeta] | None:
    """Ray's registered checkpoint, or ``None`` when it no longer loads (damaged: the
    candidates, which include its folder, then fall back past it)."""
    try:
        return registered()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged or gone: choose among the folders
        log.warning("Ray's registered checkpoint does not load (%s); choosing among the "
                    "run's checkpoint folders", e)
        return None


def load_with_retries_once(path: str) -> tuple[dict, CheckpointMeta]:
    """Rank 0's read of a candidate: a couple of retries, then the next older candidate."""
    return load_with_retries(path, tries=2, base_delay_s=0.5)
