"""Shared plumbing for the benchmarks: machine info, interleaved timing, peak memory, JSON.

Machines are noisy (2 shared cores here), so every benchmark measures the variants it compares
*interleaved* in one process — A, B, A, B, … — and reports the ratio of medians; absolute times
are kept in the JSON for context only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory and library versions: what a figure was measured on."""
    import faiss
    import numpy as np
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": mem_gb,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    return info


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def interleaved(
    variants: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each variant, run round-robin ``repeats`` times after ``warmup`` rounds.

    Round-robin (A, B, C, A, B, C, …) spreads the noise of a shared machine evenly over the
    variants, so their ratio is meaningful even when absolute times drift. Times are
    :class:`ThreadClock` ``corrected`` seconds (wall minus preemption by other processes): exact
    for the one-thread runs the benchmarks default to, where all work runs in this thread.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + repeats):
        for name, fn in variants.items():
            clock = ThreadClock()
            fn()
            elapsed = clock.read()["corrected"]
            if r >= warmup:
                times[name].append(elapsed)
    return times


class ThreadClock:
    """Wall, on-CPU and waiting-for-a-CPU seconds of the calling thread since construction.

    On a shared machine other processes preempt ours at random; Linux counts the time a thread
    was runnable but waiting for a CPU (``/proc/thread-self/schedstat``, field 2). ``corrected``
    = wall − that wait: how long the work would have taken had no other process wanted the
    CPU, yet still counting everything our own code does — computing, blocking in ``ray.get``,
    or running slower because a neighbour (our actor) shares caches and memory bandwidth.
    """

    def __init__(self) -> None:
        self.start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        try:
            fields = Path("/proc/thread-self/schedstat").read_text().split()
            cpu, wait = int(fields[0]) / 1e9, int(fields[1]) / 1e9
        except (OSError, IndexError, ValueError):  # no schedstat: no correction
            cpu, wait = time.thread_time(), 0.0
        return time.perf_counter(), cpu, wait

    def read(self) -> dict[str, float]:
        """``{"wall", "cpu", "runq_wait", "corrected"}`` seconds so far."""
        now = self._now()
        wall, cpu, wait = (b - a for a, b in zip(self.start, now, strict=True))
        return {"wall": wall, "cpu": cpu, "runq_wait": wait, "corrected": wall - wait}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C++ chatter on fd 2 (the profiler's start/stop lines) for a moment."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes held by tensors allocated inside ``fn`` (PyTorch's CPU allocator, exact).

    tracemalloc does not see PyTorch's allocator and RSS misses allocations glibc serves from
    freed heap memory, so we ask the profiler: with ``profile_memory`` every CPU allocation and
    free made during ``fn`` is recorded with the running total of bytes allocated since the
    profiler started (frees of older tensors are not counted), whose maximum is the peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation":
            peak = max(peak, int(fields.total_allocated))
    return peak


def peak_memory(fn: Callable[[], Any], device: str) -> int:
    """Peak bytes ``fn`` needs on top of what is already allocated (CUDA and CPU: exact)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    return _cpu_peak_bytes(fn)


def set_threads(n: int) -> int:
    """Use ``n`` intra-op threads in torch and faiss (``0`` = all cores); returns ``n`` used.

    The benchmarks default to one thread, as a Ray Train worker with ``cpus_per_worker=1`` runs:
    on a busy 2-core machine OpenMP's spinning threads make 2-thread timings erratic.
    """
    import faiss
    import torch

    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n


def target(
    name: str, value: float | None, op: str, threshold: float, note: str = ""
) -> dict[str, Any]:
    """One target row: ``value op threshold`` (``op`` is ``>=`` or ``<=``)."""
    met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": value, "target": f"{op} {threshold:g}", "met": met, "note": note}


def result(
    bench: str,
    quick: bool,
    params: dict[str, Any],
    figures: dict[str, Any],
    targets: list[dict[str, Any]],
    notes: list[str],
    started: float,
) -> dict[str, Any]:
    """The JSON document every benchmark returns and writes."""
    return {
        "bench": bench,
        "quick": quick,
        "machine": machine_info(),
        "params": params,
        "figures": figures,
        "targets": targets,
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(doc: dict[str, Any], path: str | Path | None = None) -> Path:
    """Write ``doc`` to ``path`` (default ``results/<bench>[_quick].json``)."""
    if path is None:
        suffix = "_quick" if doc.get("quick") else ""
        path = RESULTS_DIR / f"{doc['bench']}{suffix}.json"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    return path


def format_targets(doc: dict[str, Any]) -> str:
    """Human-readable lines: one per target."""
    lines = []
    for t in doc["targets"]:
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        value = "—" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(
            f"  {doc['bench']:<15} {t['name']:<40} {value:>9}  (target {t['target']}) "
            f"{mark}{'  ' + t['note'] if t['note'] else ''}"
        )
    return "\n".join(lines)


def cli(bench: str, run: Callable[..., dict[str, Any]], description: str) -> None:
    """``python -m experiments.bench.bench_x [--quick] [--out FILE]``."""
    parser = argparse.ArgumentParser(
        prog=f"python -m experiments.bench.bench_{bench}", description=description
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--out", default=None, help="JSON path (default: results/<bench>.json)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/faiss threads per process (default 1; 0 = all cores)",
    )
    args = parser.parse_args()
    set_threads(args.threads)
    doc = run(quick=args.quick)
    path = write_json(doc, args.out)
    print(format_targets(doc))
    for note in doc["notes"]:
        print(f"  note: {note}")
    print(f"  wrote {path} ({doc['seconds']:.0f}s)")
