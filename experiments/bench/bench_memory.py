"""Benchmark 7: memory of one hierarchy rebuild at ImageNet size, inside a Ray actor.

``N = 1,281,167`` samples x ``D = 128`` (the paper's projection embedding) arrive as fp16 shards
of ``W = 64`` ranks: DistributedSampler-style strided indices, the last rows padded by repeating
indices, produced by Ray tasks into the object store. A fresh Ray actor per variant then builds
the hierarchy, measuring its own memory:

* **new**: :func:`~hirl_ray.hierarchy.rebuild.build_from_shards` over a generator that
  ``ray.get``-s one shard at a time and drops it, as the prototype actor does: one preallocated
  float32 matrix, normalised and clustered in place;
* **old**: the previous actor path: ``ray.get`` every shard, concatenate, ``.float()``,
  ``dedup_by_index``, ``.numpy().astype(float32)``, then ``fit_hierarchy``'s normalised copy.
  (The old ``fit_hierarchy`` also held an ``N x D`` bool finiteness mask and let faiss copy its
  subsample; here both variants cluster with the current code, so the old peak is understated.)

A background thread samples ``/proc/self/status`` at 50 Hz: ``RssAnon`` (private memory, the
target's figure) and ``VmRSS`` (total, including the object-store pages the actor has mapped,
which are shared with the store, not extra copies). Figures are peak minus the baseline taken
just before the build (after imports and a warm-up clustering). Target: new peak above baseline
<= 1.5 x the float32 matrix (``N x D x 4`` = 656 MB). Both variants must give the same hierarchy.
``--quick``: N = 320,000 and one k-means iteration (the memory figures do not depend on it).
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.bench.common import cli, result, target

FULL = {"n": 1_281_167, "dim": 128, "world": 64, "ks": (1000, 100, 10), "niter": 3, "nredo": 1}
QUICK = {"n": 320_000, "dim": 128, "world": 64, "ks": (1000, 100, 10), "niter": 1, "nredo": 1}
REPO = str(Path(__file__).resolve().parents[2])
SAMPLE_HZ = 50.0


def read_status() -> dict[str, int]:
    """``RssAnon``, ``RssShmem`` and ``VmRSS`` of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssShmem", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


class PeakSampler:
    """Samples :func:`read_status` in a background thread; keeps the maxima."""

    def __init__(self, hz: float = SAMPLE_HZ) -> None:
        self.period = 1.0 / hz
        self.baseline = read_status()
        self.peak = dict(self.baseline)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            now = read_status()
            self.samples += 1
            for key, value in now.items():
                self.peak[key] = max(self.peak[key], value)
            self._stop.wait(self.period)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        final = read_status()  # a peak at the very end is not lost between two samples
        for key, value in final.items():
            self.peak[key] = max(self.peak[key], value)


def make_shard(rank: int, world: int, n: int, dim: int, seed: int) -> tuple[Any, Any]:
    """One rank's ``(indices int64, features fp16)``: strided, the last row padded by repeats.

    Features are a planted clustering: centre ``hash(i) % 1000`` plus noise, a function of the
    index up to the noise (so padded repeats differ slightly, as re-extracted features would).
    """
    rng = np.random.default_rng(seed + 1 + rank)
    centres = np.random.default_rng(seed).standard_normal((1000, dim)).astype(np.float32)
    per_rank = -(-n // world)
    idx = np.arange(rank, per_rank * world, world, dtype=np.int64) % n
    labels = (idx * 2654435761) % len(centres)
    feats = centres[labels] + 0.5 * rng.standard_normal((idx.size, dim)).astype(np.float32)
    return idx, feats.astype(np.float16)


class MemoryProbe:
    """A Ray actor that builds the hierarchy one way and reports its own memory."""

    def __init__(self, threads: int) -> None:
        import faiss
        import torch

        from hirl_ray.hierarchy.kmeans import fit_hierarchy

        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
        # Warm-up: faiss/BLAS/torch lazily allocate their pools on first use; keep those out of
        # the measured delta.
        warm = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
        fit_hierarchy(warm, (8, 2), niter=2, nredo=1, use_gpu=False)
        gc.collect()

    def build(self, variant: str, refs: list[list[Any]], num_samples: int,
              kw: dict[str, Any]) -> dict[str, Any]:
        import ray

        gc.collect()
        started = time.perf_counter()
        with PeakSampler() as sampler:
            if variant == "new":
                h = self._new(ray, refs, num_samples, kw)
            else:
                h = self._old(ray, refs, num_samples, kw)
        seconds = time.perf_counter() - started
        base, peak = sampler.baseline, sampler.peak
        return {
            "seconds": seconds,
            "samples": sampler.samples,
            "anon_peak_bytes": peak["RssAnon"] - base["RssAnon"],
            "rss_peak_bytes": peak["VmRSS"] - base["VmRSS"],
            "shmem_peak_bytes": peak["RssShmem"] - base["RssShmem"],
            "baseline_anon_bytes": base["RssAnon"],
            "baseline_rss_bytes": base["VmRSS"],
            "level0": h.assignments[0].numpy(),
        }

    @staticmethod
    def _new(ray: Any, refs: list[list[Any]], num_samples: int, kw: dict[str, Any]) -> Any:
        from hirl_ray.hierarchy.rebuild import build_from_shards

        def one_at_a_time():
            for indices_ref, features_ref in refs:
                indices, features = ray.get([indices_ref, features_ref], timeout=300)
                yield indices, features
                del indices, features

        return build_from_shards(one_at_a_time(), num_samples, kw.pop("ks"), **kw)

    @staticmethod
    def _old(ray: Any, refs: list[list[Any]], num_samples: int, kw: dict[str, Any]) -> Any:
        import torch

        from hirl_ray.eval.features import dedup_by_index
        from hirl_ray.hierarchy.kmeans import fit_hierarchy

        parts = ray.get([ref for pair in refs for ref in pair], timeout=300)
        indices = torch.from_numpy(np.concatenate(parts[0::2])).long()
        feats = torch.from_numpy(np.concatenate(parts[1::2])).float()
        del parts
        feats, present = dedup_by_index(feats, indices, num_samples)
        if not bool(present.all()):
            feats = feats[present]
        return fit_hierarchy(feats.numpy().astype(np.float32), kw.pop("ks"), **kw)


def run(quick: bool = False, **overrides: Any) -> dict[str, Any]:
    """Peak memory of the new and old rebuild paths, each in a fresh actor, same shards."""
    import faiss
    import ray

    started = time.perf_counter()
    p = {**(QUICK if quick else FULL), **overrides}
    n, dim, world = p["n"], p["dim"], p["world"]
    threads = faiss.omp_get_max_threads()
    shard_bytes = -(-n // world) * world * (dim * 2 + 8)
    own_ray = not ray.is_initialized()
    if own_ray:
        # address="local": always our own Ray, even if another one runs on this machine.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
            object_store_memory=max(200 * 2**20, int(2.5 * shard_bytes)),
            runtime_env={"env_vars": {"PYTHONPATH": REPO}},
        )
    try:
        task = ray.remote(num_returns=2, num_cpus=1)(make_shard)
        refs = [list(task.remote(r, world, n, dim, 0)) for r in range(world)]
        ray.wait([r for pair in refs for r in pair], num_returns=2 * world, timeout=600)
        probe_cls = ray.remote(num_cpus=0)(MemoryProbe)
        kw = {"ks": tuple(p["ks"]), "seed": 0, "niter": p["niter"], "nredo": p["nredo"],
              "use_gpu": False}
        runs = {}
        for variant in ("new", "old"):
            probe = probe_cls.remote(threads)  # a fresh process: no memory kept from before
            try:
                runs[variant] = ray.get(probe.build.remote(variant, refs, n, dict(kw)),
                                        timeout=1800)
            finally:
                ray.kill(probe)
        del refs
    finally:
        if own_ray:
            ray.shutdown()
    matrix = n * dim * 4
    agreement = float((runs["new"].pop("level0") == runs["old"].pop("level0")).mean())
    new, old = runs["new"], runs["old"]
    figures = {
        "n": n,
        "dim": dim,
        "world": world,
        "clusters": list(p["ks"]),
        "niter": p["niter"],
        "matrix_mb": matrix / 1e6,
        "new": new,
        "old": old,
        "new_anon_over_matrix": new["anon_peak_bytes"] / matrix,
        "old_anon_over_matrix": old["anon_peak_bytes"] / matrix,
        "old_over_new_anon": old["anon_peak_bytes"] / max(1, new["anon_peak_bytes"]),
        "new_rss_over_matrix": new["rss_peak_bytes"] / matrix,
        "old_rss_over_matrix": old["rss_peak_bytes"] / matrix,
        "level0_assignment_agreement": agreement,
    }
    targets = [
        target("new: private peak / float32 matrix", figures["new_anon_over_matrix"], "<=", 1.5),
        target("old / new private peak", figures["old_over_new_anon"], ">=", 2.0),
        target("same hierarchy (level-0 agreement)", agreement, ">=", 1.0),
    ]
    notes = [
        f"N={n} x D={dim} from {world} fp16 shards; float32 matrix {matrix / 1e6:.0f} MB; "
        f"K={list(p['ks'])}, niter={p['niter']}, {threads} faiss thread(s)",
        f"new: private +{new['anon_peak_bytes'] / 1e6:.0f} MB "
        f"({figures['new_anon_over_matrix']:.2f}x matrix), total RSS "
        f"+{new['rss_peak_bytes'] / 1e6:.0f} MB, {new['seconds']:.0f}s; old: private "
        f"+{old['anon_peak_bytes'] / 1e6:.0f} MB ({figures['old_anon_over_matrix']:.2f}x), "
        f"total RSS +{old['rss_peak_bytes'] / 1e6:.0f} MB, {old['seconds']:.0f}s",
        "total RSS also counts the object-store pages of the shards the actor mapped "
        f"(new +{new['shmem_peak_bytes'] / 1e6:.0f} MB, old +{old['shmem_peak_bytes'] / 1e6:.0f}"
        " MB): shared with the store, not copies",
    ]
    return result("memory", quick, p, figures, targets, notes, started)


if __name__ == "__main__":
    cli("memory", run, __doc__.splitlines()[0])
