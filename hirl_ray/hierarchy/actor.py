"""The prototype actor: one Ray actor owns the global prototype hierarchy.

Workers extract features of their shard and hand them over as Ray object refs
(``submit_features``); once every rank of a round has submitted, a background
thread scatters them one at a time into one matrix, de-duplicating by dataset index, and
clusters it (:func:`~hirl_ray.hierarchy.rebuild.build_from_shards`), bumps the
version, writes a snapshot and publishes it. Workers never wait for k-means: they
keep the previous version and pick up the new one when ``wait_for_version``
resolves (official HIRL instead blocks all ranks at a barrier while rank 0
clusters; see shared/FIELD_NOTES.md). The actor reloads its newest snapshot in
``__init__``, so a restarted actor serves the same version (ray PR #32153).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray

from hirl_ray import storage
from hirl_ray.hierarchy.kmeans import PrototypeHierarchy
from hirl_ray.hierarchy.rebuild import build_from_shards
from hirl_ray.hierarchy.snapshot import (
    latest_snapshot,
    load_hierarchy,
    save_hierarchy,
    snapshot_name,
)

log = logging.getLogger(__name__)

NAMESPACE = "hirl_ray"


@dataclass(frozen=True)
class ActorSettings:
    """Everything the actor needs; a small picklable value."""

    snapshot_dir: str
    num_clusters: tuple[int, ...]
    num_samples: int
    seed: int = 0
    niter: int = 20
    nredo: int = 5
    max_points_per_centroid: int = 1000
    use_gpu: bool | None = None
    kmeans_init: str = "random"  # hirl.kmeans_init: "random" (official) or "kmeans++"


class PrototypeActor:
    """Owns, rebuilds, persists and serves the :class:`PrototypeHierarchy`."""

    def __init__(self, settings: ActorSettings) -> None:
        self.settings = settings
        self._cond = threading.Condition()
        # One build at a time: versions are assigned and snapshots written in order even when
        # rounds complete back to back (or a retried round lands after a restart).
        self._build_lock = threading.Lock()
        self._rounds: dict[int, dict[int, list[Any]]] = {}
        self._building: int | None = None
        self._last_build_s: float | None = None
        self._error: str | None = None
        self._latest: PrototypeHierarchy | None = None
        path = latest_snapshot(settings.snapshot_dir)
        if path is not None:
            self._latest = load_hierarchy(path)
            log.info("prototype actor restored hierarchy v%d from %s", self._latest.version, path)

    # --- queries (cheap; answered while a rebuild runs: the actor is threaded) ---
    def latest_version(self) -> int:
        """Version of the newest published hierarchy (0 = none yet)."""
        return self._latest.version if self._latest is not None else 0

    def get(self, version: int | None = None) -> PrototypeHierarchy | None:
        """The newest hierarchy, or a given older ``version`` loaded from its snapshot."""
        latest = self._latest
        if version is None or (latest is not None and latest.version == version):
            return latest
        if version == 0:
            return None
        path = storage.join(self.settings.snapshot_dir, snapshot_name(version))
        if not storage.exists(path):
            raise FileNotFoundError(f"hierarchy snapshot v{version} not found at {path}")
        return load_hierarchy(path)

    def wait_for_version(self, min_version: int, timeout_s: float | None = None
                         ) -> PrototypeHierarchy | None:
        """Block (this call only) until a version ≥ ``min_version`` exists; then return it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self.latest_version() < min_version and self._error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(timeout=remaining if remaining is not None else 5.0)
            if self._error is not None and self.latest_version() < min_version:
                raise RuntimeError(f"hierarchy rebuild failed: {self._error}")
            return self._latest

    def status(self) -> dict[str, Any]:
        """Version, whether a rebuild runs, and how long the last one took."""
        return {"version": self.latest_version(), "building_round": self._building,
                "last_build_s": self._last_build_s, "pending_rounds": sorted(self._rounds),
                "error": self._error}

    # --- feature submission ---
    def submit_features(self, round_id: int, rank: int, world_size: int,
                        refs: list[ray.ObjectRef]) -> None:
        """Register one rank's ``[indices_ref, features_ref]`` for a rebuild round.

        The refs arrive nested in a list so Ray does not resolve them in this call;
        the build thread fetches them. When all ``world_size`` ranks are in, the
        rebuild starts in the background and this call returns at once.
        """
        with self._cond:
            shards = self._rounds.setdefault(round_id, {})
            shards[rank] = refs
            if len(shards) < world_size:
                return
            del self._rounds[round_id]
            # Older incomplete rounds are superseded by this one.
            for old in [r for r in self._rounds if r < round_id]:
                del self._rounds[old]
            self._building = round_id
        threading.Thread(target=self._build, args=(round_id, list(shards.values())),
                         daemon=True, name=f"hierarchy-round-{round_id}").start()

    def _build(self, round_id: int, shards: list[list[ray.ObjectRef]]) -> None:
        with self._build_lock:
            self._build_locked(round_id, shards)

    def _build_locked(self, round_id: int, shards: list[list[ray.ObjectRef]]) -> None:
        start = time.perf_counter()
        try:
            version = self.latest_version() + 1
            # One shard fetched at a time, scattered into one float32 matrix (hierarchy/rebuild.py):
            # at ImageNet scale concatenating every shard and copying held ~4 matrices.
            h = build_from_shards(_fetch_one_at_a_time(shards), self.settings.num_samples,
                                  self.settings.num_clusters,
                                  seed=self.settings.seed + 1000 * version,
                                  niter=self.settings.niter, nredo=self.settings.nredo,
                                  max_points_per_centroid=self.settings.max_points_per_centroid,
                                  use_gpu=self.settings.use_gpu, version=version,
                                  init=self.settings.kmeans_init)
            save_hierarchy(h, self.settings.snapshot_dir)
            with self._cond:
                self._latest = h
                self._error = None
                self._last_build_s = time.perf_counter() - start
                self._building = None
                self._cond.notify_all()
            log.info("hierarchy v%d built in %.1fs (round %d)", version, self._last_build_s,
                     round_id)
        except Exception as e:  # surfaced to waiting workers, never silently dropped
            log.exception("hierarchy rebuild for round %d failed", round_id)
            with self._cond:
                self._error = f"{type(e).__name__}: {e}"
                self._building = None
                self._cond.notify_all()


def _fetch_one_at_a_time(shards: list[list[ray.ObjectRef]]) -> Iterator[tuple[Any, Any]]:
    """Each rank's ``(indices, features)``, the next fetched only once the last is consumed."""
    for indices_ref, features_ref in shards:
        indices, features = ray.get([indices_ref, features_ref])
        yield indices, features
        del indices, features  # drop our view of the shard before mapping the next


def actor_name(run_name: str) -> str:
    """The Ray actor name for a run (one hierarchy per run)."""
    return f"hirl-prototypes-{run_name}"


def start_actor(name: str, settings: ActorSettings, num_cpus: float = 0.0,
                num_gpus: float = 0.0) -> ray.actor.ActorHandle:
    """Create (or get) the named actor; restarts reload the newest snapshot."""
    remote_cls = ray.remote(PrototypeActor)
    return remote_cls.options(  # type: ignore[attr-defined]
        name=name, namespace=NAMESPACE, get_if_exists=True, max_restarts=-1,
        max_task_retries=-1, max_concurrency=16, num_cpus=num_cpus, num_gpus=num_gpus,
    ).remote(settings)


def get_actor(name: str) -> ray.actor.ActorHandle:
    """Look up the run's actor from a worker."""
    return ray.get_actor(name, namespace=NAMESPACE)
