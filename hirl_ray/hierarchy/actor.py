"""The prototype actor: one Ray actor owns the global prototype hierarchy.

Workers extract features of their shard and hand them over as Ray object refs in a
:class:`Shard`. Once every rank of a round has submitted, a background task fetches the
shards one at a time, runs :func:`fit_hierarchy` off the event loop, bumps the version,
writes a snapshot (with its :class:`~hirl_ray.hierarchy.snapshot.Origin`: which attempt and
round built it) and puts the hierarchy into the object store **once**; waiting ranks get the
ref, not a copy (64 ranks x 370 MB would be 23 GB in one node's store).

Why an async actor: a threaded actor has ``max_concurrency`` call threads, and a wait that
blocks a thread deadlocks once waiters fill the pool (17 ranks against 16 threads). Here a
wait is a coroutine parked on an :class:`asyncio.Event`, every wait is bounded
(``timeout_s``; the caller asks again), and status/get answer during a build.

Faults: rounds are keyed by ``(attempt, round)``, so shards of a dead worker group never
complete a new group's round; a wait carries its rank's shard refs, so after an actor
restart the retried waits re-register the round and it is rebuilt; a failed build settles
only its own round (waiters get ``failed`` and train on with the old hierarchy). The actor
reloads its newest snapshot and all origins in ``__init__`` (ray PR #32153). Official HIRL
instead all-reduces the full N x D feature matrix to every rank (about 10 GB at ImageNet x
2048-d fp32), clusters on rank 0 while the other ranks wait at a barrier, then broadcasts.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from hirl_ray import storage
from hirl_ray.hierarchy.faiss_build import describe_faiss
from hirl_ray.hierarchy.kmeans import PrototypeHierarchy
from hirl_ray.hierarchy.rebuild import build_from_shards
from hirl_ray.hierarchy.snapshot import (
    Origin,
    latest_snapshot,
    load_hierarchy,
    read_origins,
    save_hierarchy,
    snapshot_name,
)

log = logging.getLogger(__name__)

NAMESPACE = "hirl_ray"
# Concurrent calls the async actor accepts: one parked wait per rank plus queries. Waits are
# coroutines (no thread each), so a generous limit costs nothing.
MAX_CONCURRENCY = 4096
_KEEP_REFS = 3  # hierarchy versions kept in the object store (latest + recently asked)


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
    fetch_timeout_s: float = 600.0
    run_name: str = ""  # the "run" tag of the actor's Ray metrics
    ray_metrics: bool = True  # observe.ray_metrics


@dataclass(frozen=True)
class Shard:
    """One rank's features for a rebuild round.

    ``refs`` is ``(indices_ref, features_ref)``; nested in a dataclass, Ray passes the refs
    instead of resolving them in the call. ``attempt`` identifies the worker-group
    incarnation (rank 0 picks it at start), so shards of a dead group never complete a
    round of the group that replaced it.
    """

    attempt: int
    round: int
    rank: int
    world_size: int
    refs: tuple[Any, Any]


@dataclass(frozen=True)
class RoundStatus:
    """Answer to :meth:`PrototypeActor.wait_round`.

    ``state``: ``"ready"`` (``version`` built from ``round`` >= the asked round; ``ref`` holds
    the hierarchy's object ref), ``"failed"`` (rounds up to ``round`` failed: keep the old
    hierarchy) or ``"pending"`` (the wait timed out: ask again).
    """

    state: str
    version: int = 0
    round: int = -1
    ref: tuple[Any, ...] = ()
    error: str | None = None


def fetch_shards(shards: Sequence[tuple[Any, Any]], timeout_s: float
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(indices, features)`` numpy pairs, fetching one shard at a time.

    Runs in a worker thread (``asyncio.to_thread``), not on the actor's event loop, so the
    blocking ``ray.get`` is fine there (Ray warns about it once all the same).
    """
    for indices_ref, features_ref in shards:
        yield (np.asarray(ray.get(indices_ref, timeout=timeout_s)),
               np.asarray(ray.get(features_ref, timeout=timeout_s)))


class RebuildMetrics:
    """The actor's ``ray.util.metrics`` (Ray dashboard, Prometheus; README "Watching a run")."""

    def __init__(self, run_name: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"run": run_name}
        keys = ("run",)
        self.seconds = Histogram(
            "hirl_ray_rebuild_seconds", description="Wall time of one hierarchy rebuild.",
            boundaries=[1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600], tag_keys=keys)
        self.phase = Gauge("hirl_ray_rebuild_phase_seconds",
                           description="Seconds of the last rebuild's phases (gather, levelN, "
                           "publish).", tag_keys=(*keys, "phase"))
        self.rss = Gauge("hirl_ray_rebuild_peak_rss_bytes",
                         description="Peak resident memory of the prototype actor.", tag_keys=keys)
        self.version = Gauge("hirl_ray_rebuild_version",
                             description="Version of the newest built hierarchy.", tag_keys=keys)
        self.builds = Counter("hirl_ray_rebuilds_total", description="Hierarchies built.",
                              tag_keys=keys)
        self.superseded = Counter("hirl_ray_rebuild_rounds_superseded_total",
                                  description="Rebuild rounds dropped for a newer one.",
                                  tag_keys=keys)
        self.failed = Counter("hirl_ray_rebuild_failures_total",
                              description="Rebuild rounds that failed.", tag_keys=keys)

    def built(self, telemetry: dict[str, Any]) -> None:
        self.seconds.observe(telemetry["seconds"], tags=self.tags)
        for phase, seconds in telemetry["phases"].items():
            self.phase.set(seconds, tags={**self.tags, "phase": phase})
        self.rss.set(telemetry["peak_rss_gb"] * 1e9, tags=self.tags)
        self.version.set(telemetry["version"], tags=self.tags)
        self.builds.inc(1, tags=self.tags)


def peak_rss_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def build_from_refs(shards: Sequence[tuple[Any, Any]], settings: ActorSettings,
                    version: int, timings: dict[str, float] | None = None) -> PrototypeHierarchy:
    """Fetch the shards of a round and cluster them: the one step that holds feature memory.

    Args:
        shards: ``(indices_ref, features_ref)`` per rank (fp16 features).
        settings: Clustering settings and the dataset size.
        version: Version stamped on the result (also seeds k-means).
        timings: Receives the seconds of each phase (``gather``, ``level0``, …).
    """
    # One shard at a time, scattered into one float32 matrix (hierarchy/rebuild.py): at ImageNet
    # scale, concatenating every shard and copying it held ~3 matrices (bench_memory).
    return build_from_shards(fetch_shards(shards, settings.fetch_timeout_s), settings.num_samples,
                             settings.num_clusters, seed=settings.seed + 1000 * version,
                             niter=settings.niter, nredo=settings.nredo,
                             max_points_per_centroid=settings.max_points_per_centroid,
                             use_gpu=settings.use_gpu, version=version,
                             init=settings.kmeans_init, timings=timings)


class PrototypeActor:
    """Owns, rebuilds, persists and serves the :class:`PrototypeHierarchy` (async actor)."""

    def __init__(self, settings: ActorSettings) -> None:
        self.settings = settings
        # Which faiss this node runs (faiss-cpu vs faiss-gpu, GPUs visible): said at start-up.
        self._faiss = f"{describe_faiss()} on {socket.gethostname()}"
        self._collecting: dict[tuple[int, int], dict[int, tuple[Any, Any]]] = {}
        self._complete: dict[tuple[int, int], list[tuple[Any, Any]]] = {}  # in completion order
        self._failed: dict[int, tuple[int, str]] = {}  # attempt -> (highest failed round, error)
        self._building: tuple[int, int] | None = None
        self._builder: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self._refs: dict[int, Any] = {}  # version -> object ref (put once)
        self._loading: dict[int, asyncio.Task] = {}
        self._puts = self._builds = 0
        self._last_build_s: float | None = None
        # The last rebuild's telemetry (phases, memory) and rounds dropped for newer ones.
        self._telemetry: dict[str, Any] | None = None
        self._superseded = 0
        self._metrics = RebuildMetrics(settings.run_name) if settings.ray_metrics else None
        self._last_error: str | None = None
        self._latest: PrototypeHierarchy | None = None
        self._origins: dict[int, Origin] = read_origins(settings.snapshot_dir)
        path = latest_snapshot(settings.snapshot_dir)
        if path is not None:
            self._latest = load_hierarchy(path)
            log.info("prototype actor restored hierarchy v%d from %s", self._latest.version, path)

    # --- queries (answered at once, also while a rebuild runs) ---
    async def latest_version(self) -> int:
        """Version of the newest published hierarchy (0 = none yet)."""
        return self._version()

    async def get(self, version: int | None = None) -> PrototypeHierarchy | None:
        """The newest hierarchy or an older ``version`` (a copy per caller: not for workers)."""
        if version is None or version == self._version():
            return self._latest
        if version == 0:
            return None
        return await asyncio.to_thread(load_hierarchy, self._snapshot_path(version))

    async def get_ref(self, version: int | None = None) -> list[Any]:
        """``[ref]`` to a version in the object store (put once; ``[]`` for version 0)."""
        version = self._version() if version is None else version
        return [] if version == 0 else [await self._ref_for(version)]

    async def version_of_round(self, attempt: int, round_id: int) -> int | None:
        """The newest version built from exactly ``(attempt, round_id)``, if any."""
        found = [o.version for o in self._origins.values()
                 if o.attempt == attempt and o.round == round_id]
        return max(found) if found else None

    async def status(self) -> dict[str, Any]:
        """Version, rounds collecting/building, puts into the object store, last error."""
        return {"version": self._version(), "building_round": self._building,
                "collecting": {f"{a}/{r}": len(s) for (a, r), s in self._collecting.items()},
                "queued": [list(k) for k in self._complete], "builds": self._builds,
                "puts": self._puts, "last_build_s": self._last_build_s,
                "error": self._last_error, "faiss": self._faiss,
                "last_rebuild": self._telemetry, "superseded": self._superseded}

    # --- rounds ---
    async def wait_round(self, attempt: int, min_round: int, shard: Shard | None = None,
                         timeout_s: float = 30.0) -> RoundStatus:
        """Register ``shard`` (idempotent) and wait until rounds >= ``min_round`` settle.

        Bounded by ``timeout_s`` (then ``"pending"``: ask again). Carrying the shard in every
        wait is what makes an actor restart harmless: Ray retries the call on the restarted
        actor and the round is collected again from the refs the ranks still hold.
        """
        if shard is not None:
            self._register(shard)
        deadline = time.monotonic() + timeout_s
        while True:
            settled = await self._settled(attempt, min_round)
            remaining = deadline - time.monotonic()
            if settled is not None or remaining <= 0:
                return settled or RoundStatus("pending")
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                pass

    def _version(self) -> int:
        return self._latest.version if self._latest is not None else 0

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _snapshot_path(self, version: int) -> str:
        return storage.join(self.settings.snapshot_dir, snapshot_name(version))

    def _built(self, attempt: int, min_round: int) -> Origin | None:
        found = [o for o in self._origins.values() if o.attempt == attempt and o.round >= min_round]
        return max(found, key=lambda o: o.version) if found else None

    async def _settled(self, attempt: int, min_round: int) -> RoundStatus | None:
        origin = self._built(attempt, min_round)
        if origin is not None:
            return RoundStatus("ready", origin.version, origin.round,
                               (await self._ref_for(origin.version),))
        failed = self._failed.get(attempt)
        if failed is not None and failed[0] >= min_round:
            return RoundStatus("failed", self._version(), failed[0], error=failed[1])
        return None

    def _register(self, shard: Shard) -> None:
        key = (shard.attempt, shard.round)
        failed = self._failed.get(shard.attempt)
        if (self._built(*key) is not None or key in self._complete or key == self._building
                or (failed is not None and failed[0] >= shard.round)):
            return
        shards = self._collecting.setdefault(key, {})
        shards[shard.rank] = tuple(shard.refs)
        if len(shards) < shard.world_size:
            return
        del self._collecting[key]
        self._complete[key] = [shards[r] for r in sorted(shards)]
        if self._builder is None or self._builder.done():
            self._builder = asyncio.get_running_loop().create_task(self._build_all())

    async def _build_all(self) -> None:
        """Build complete rounds one at a time (versions in order), newest first."""
        while self._complete:
            key = next(reversed(self._complete))
            shards = self._complete.pop(key)
            for other in list(self._complete):  # obsolete: the newer round answers them
                del self._complete[other]
                self._dropped(other)
                if other[0] != key[0]:
                    self._fail(other, f"superseded by attempt {key[0]}")
            self._building = key
            try:
                await self._build(key, shards)
            except Exception as e:  # noqa: BLE001 - settles the round; training goes on
                log.exception("hierarchy rebuild for round %s failed; workers keep v%d",
                              key, self._version())
                self._fail(key, f"{type(e).__name__}: {e}")
            finally:
                self._building = None
                self._notify()

    async def _build(self, key: tuple[int, int], shards: list[tuple[Any, Any]]) -> None:
        start = time.perf_counter()
        version = max([self._version(), *self._origins]) + 1
        phases: dict[str, float] = {}
        # Off the event loop: waits, status and get stay answerable during k-means.
        h = await asyncio.to_thread(build_from_refs, shards, self.settings, version, phases)
        published = time.perf_counter()
        origin = Origin(version=version, attempt=key[0], round=key[1])
        await asyncio.to_thread(save_hierarchy, h, self.settings.snapshot_dir, origin)
        self._latest, self._origins[version] = h, origin
        self._builds += 1
        await self._ref_for(version)
        phases["publish"] = time.perf_counter() - published  # snapshot + object store
        self._last_build_s = time.perf_counter() - start
        # Obsolete: older rounds of this attempt, and every round of older (dead) attempts.
        for old in [k for k in self._collecting if k[0] != key[0] or k[1] <= key[1]]:
            del self._collecting[old]
            self._dropped(old)
        self._telemetry = {"version": version, "attempt": key[0], "round": key[1],
                           "seconds": self._last_build_s, "phases": phases,
                           "peak_rss_gb": peak_rss_gb(), "superseded": self._superseded,
                           "finished_unix": time.time()}
        if self._metrics is not None:
            self._metrics.built(self._telemetry)
        log.info("hierarchy v%d built in %.1fs (attempt %d, round %d)", version,
                 self._last_build_s, *key)

    def _dropped(self, key: tuple[int, int]) -> None:
        """Count a round given up for a newer one (its waiters get the newer answer)."""
        self._superseded += 1
        log.info("hierarchy round %s superseded by a newer round", key)
        if self._metrics is not None:
            self._metrics.superseded.inc(1, tags=self._metrics.tags)

    def _fail(self, key: tuple[int, int], error: str) -> None:
        previous = self._failed.get(key[0], (-1, ""))[0]
        self._failed[key[0]] = (max(previous, key[1]), error)
        self._last_error = f"round {key[1]} (attempt {key[0]}): {error}"
        if self._metrics is not None and not error.startswith("superseded"):
            self._metrics.failed.inc(1, tags=self._metrics.tags)
        for old in [k for k in self._collecting if k[0] == key[0] and k[1] <= key[1]]:
            del self._collecting[old]

    async def _ref_for(self, version: int) -> Any:
        """Put ``version`` into the object store once; concurrent askers share the put."""
        if version in self._refs:
            return self._refs[version]
        task = self._loading.get(version)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._put(version))
            self._loading[version] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._loading.pop(version, None)

    async def _put(self, version: int) -> Any:
        latest = self._latest
        if latest is not None and latest.version == version:
            h = latest
        else:
            path = self._snapshot_path(version)
            if not await asyncio.to_thread(storage.exists, path):
                raise FileNotFoundError(f"hierarchy snapshot v{version} not found at {path}")
            h = await asyncio.to_thread(load_hierarchy, path)
        ref = await asyncio.to_thread(ray.put, h)
        self._puts += 1
        self._refs[version] = ref
        # Keep the newest few; holders of an evicted ref keep its object alive (borrowers).
        for old in sorted(self._refs)[:-_KEEP_REFS]:
            if old != self._version():
                del self._refs[old]
        return ref


def actor_name(run_name: str) -> str:
    """The Ray actor name for a run (one hierarchy per run)."""
    return f"hirl-prototypes-{run_name}"


def start_actor(name: str, settings: ActorSettings, num_cpus: float = 0.0,
                num_gpus: float = 0.0) -> ray.actor.ActorHandle:
    """Create (or get) the named actor; restarts reload the newest snapshot.

    ``max_task_retries=-1``: calls in flight when the actor dies run again on the restarted
    one; a retried :meth:`PrototypeActor.wait_round` re-registers its shard.
    """
    remote_cls = ray.remote(PrototypeActor)
    return remote_cls.options(  # type: ignore[attr-defined]
        name=name, namespace=NAMESPACE, get_if_exists=True, max_restarts=-1,
        max_task_retries=-1, max_concurrency=MAX_CONCURRENCY, num_cpus=num_cpus,
        num_gpus=num_gpus,
    ).remote(settings)


def get_actor(name: str) -> ray.actor.ActorHandle:
    """Look up the run's actor from a worker."""
    return ray.get_actor(name, namespace=NAMESPACE)
