"""Run every benchmark (``make bench``; ``make bench-quick`` passes ``--quick``).

Each benchmark runs in its own process (``python -m experiments.bench.bench_<name>``), so one
benchmark's Ray session, threads or freed-but-cached memory cannot colour the next. Results:
``results/<name>[_quick].json`` per benchmark, ``results/latest.json`` with all of them, and
``results/latest.md``, the ratio table for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from experiments.bench.common import RESULTS_DIR, machine_info

BENCHES = ("path_loss", "rebuild", "memory", "async", "hirl_overhead", "ray", "peer",
           "pipeline")
REPO = Path(__file__).resolve().parents[2]


def run_one(name: str, quick: bool, threads: int, timeout_s: float) -> dict[str, Any]:
    """One benchmark in a subprocess; its JSON document, or an error document."""
    out = RESULTS_DIR / f"{name}{'_quick' if quick else ''}.json"
    cmd = [
        sys.executable,
        "-m",
        f"experiments.bench.bench_{name}",
        "--out",
        str(out),
        "--threads",
        str(threads),
    ] + (["--quick"] if quick else [])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.setdefault("RAY_DEDUP_LOGS", "1")
    print(f"== {name}{' (quick)' if quick else ''}", flush=True)
    started = time.perf_counter()
    out.unlink(missing_ok=True)  # a stale file must not pass for this run's result
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout_s)
        ok = proc.returncode == 0 and out.is_file()
        error = None if ok else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout_s:.0f}s"
    if error is not None:
        print(f"   {name} failed: {error}", flush=True)
        return {
            "bench": name,
            "quick": quick,
            "error": error,
            "targets": [],
            "notes": [],
            "seconds": round(time.perf_counter() - started, 1),
        }
    return json.loads(out.read_text())


def table(docs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per target of every benchmark."""
    rows = []
    for name, doc in docs.items():
        if doc.get("error"):
            rows.append(
                {
                    "bench": name,
                    "figure": "—",
                    "value": None,
                    "target": "—",
                    "met": None,
                    "note": doc["error"],
                }
            )
        for t in doc.get("targets", []):
            rows.append(
                {
                    "bench": name,
                    "figure": t["name"],
                    "value": t["value"],
                    "target": t["target"],
                    "met": t["met"],
                    "note": t.get("note", ""),
                }
            )
    return rows


def _value(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.2e}" if abs(v) < 1e-2 else f"{v:.3g}"


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any], quick: bool) -> str:
    """The README "Performance" table."""
    mark = {True: "✅", False: "❌", None: "—"}
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gb']} GB, {machine['gpu'] or 'no GPU'}; torch {machine['torch']}, "
        f"faiss {machine['faiss']}; `{'make bench-quick' if quick else 'make bench'}`.",
        "",
        "| benchmark | figure | measured | target | met |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        met = mark[r["met"]] if "informative" not in (r["note"] or "") else "(info)"
        lines.append(
            f"| {r['bench']} | {r['figure']} | {_value(r['value'])} | {r['target']} | {met} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: ≤10 min on 2 cores")
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/faiss threads per benchmark process (0 = all cores)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per benchmark (default 900 quick, 3600 full)",
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: rebuild latest.json/.md from the per-benchmark JSON files",
    )
    args = parser.parse_args(argv)
    timeout = args.timeout or (900.0 if args.quick else 3600.0)
    started = time.perf_counter()
    if args.collect:
        docs = {}
        for name in args.only:
            path = RESULTS_DIR / f"{name}{'_quick' if args.quick else ''}.json"
            if path.is_file():
                docs[name] = json.loads(path.read_text())
    else:
        docs = {name: run_one(name, args.quick, args.threads, timeout) for name in args.only}
    previous = RESULTS_DIR / "latest.json"
    if set(args.only) != set(BENCHES) and previous.is_file():
        # A partial run updates the latest table of the same mode instead of replacing it.
        old = json.loads(previous.read_text())
        if old.get("quick") == args.quick:
            merged = {**old["benches"], **docs}
            docs = {k: merged[k] for k in BENCHES if k in merged}
    machine = machine_info()
    rows = table(docs)
    latest = {
        "quick": args.quick,
        "machine": machine,
        "seconds": round(time.perf_counter() - started, 1),
        "table": rows,
        "benches": docs,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "latest.json").write_text(json.dumps(latest, indent=2, default=float) + "\n")
    md = markdown(rows, machine, args.quick)
    (RESULTS_DIR / "latest.md").write_text(md)
    print("\n" + md)
    print(f"total {latest['seconds']:.0f}s; wrote {RESULTS_DIR / 'latest.json'} and latest.md")
    return 1 if any(d.get("error") for d in docs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
