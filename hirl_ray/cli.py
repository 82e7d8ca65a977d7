"""Command line: ``hirl-ray fit|eval|status|tune|report|dashboard experiments/x.yaml key=value``."""

from __future__ import annotations

import argparse
import json
import sys

from hirl_ray import storage
from hirl_ray.config import ConfigError, RunStopped, parse_override
from hirl_ray.logs import console, redact
from hirl_ray.runs import LAYOUT
from hirl_ray.train.checkpoint import CheckpointError
from hirl_ray.train.interrupt import Interrupted

#: ``hirl-ray eval`` writes its metrics here, in the run folder (or the checkpoint folder
#: outside the run layout); ``metrics.json`` stays the fit's own final evaluation.
EVAL_METRICS = "eval_metrics.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hirl-ray", description="HIRL pretraining on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="pretrain (resumes the run folder if it has checkpoints)")
    fit.add_argument("config", nargs="?", default=None,
                     help="experiment YAML (default: the embedded default experiment)")
    fit.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5")
    ev = sub.add_parser("eval", help="evaluate a checkpoint or run folder with the eval "
                        "protocols (kNN, clustering per level, …), optionally with plots")
    ev.add_argument("checkpoint",
                    help=f"a run folder or one of its {LAYOUT.train}/epoch_* folders")
    ev.add_argument("overrides", nargs="*",
                    help="data.key=value (evaluate on other data) or eval.params.<protocol>."
                         "<key>=value, e.g. data.name=digits eval.params.knn.k=10")
    ev.add_argument("--protocols", default=None,
                    help="comma-separated protocols, or all (default: the run's eval.protocols)")
    ev.add_argument("--plots", default=None, metavar="DIR",
                    help="write PNGs there: embeddings, per-level bars, prototype tree")
    ev.add_argument("--out", default=None,
                    help=f"metrics JSON (default: <run>/{EVAL_METRICS})")
    ev.add_argument("--device", default="cpu", help="cpu or cuda")
    st = sub.add_parser("status", help="epoch, step, hierarchy, last checkpoint and rebuild, "
                        "throughput of a running or finished fit (reads its status.json)")
    st.add_argument("run", help="a run folder (storage.path/storage.name, local or s3://)")
    tu = sub.add_parser("tune", help="search hierarchy depth/cluster sizes (Optuna + ASHA)")
    tu.add_argument("config", help="experiment YAML with a tune: section (or, with --resume, "
                    "a sweep folder)")
    tu.add_argument("overrides", nargs="*", help="section.key=value, e.g. tune.num_trials=4")
    tu.add_argument("--resume", action="store_true",
                    help="continue an interrupted sweep; finished trials are not rerun")
    rp = sub.add_parser("report", help=f"write <sweep>/{LAYOUT.report}/index.html and PNGs")
    rp.add_argument("sweep_dir", help="a sweep folder (storage.path/storage.name)")
    rp.add_argument("--screenshot", action="store_true",
                    help="also render report/screenshot.png in headless Chromium")
    db = sub.add_parser("dashboard", help="start optuna-dashboard for a sweep's study")
    db.add_argument("sweep_dir", help="a sweep folder (storage.path/storage.name)")
    db.add_argument("--port", type=int, default=8080)
    return p


def _tune_main(args: argparse.Namespace) -> int:
    """``hirl-ray tune|report|dashboard``; Ray/Optuna are imported only here."""
    if args.command == "tune":
        from hirl_ray.api import tune

        result = tune(args.config, list(args.overrides), resume=args.resume)
        table = result.results
        cols = [c for c in ("trial_id", "num_clusters", "epochs_trained", "stopped_early")
                if c in table.columns]
        cols += [c for c in table.columns if c.startswith(("knn_acc/", "nmi/", "label_free/"))]
        print(table[cols].to_string(index=False))
        print(f"\nBest configuration  {result.best_config}")
        print(f"Best checkpoint     {result.best_checkpoint}")
        print(f"Sweep folder        {result.sweep_dir}  ({LAYOUT.results}, {LAYOUT.optuna_db}, "
              f"{LAYOUT.tune}/)")
        print(f"Report              hirl-ray report {result.sweep_dir}")
        if result.interrupted:
            print(f"Interrupted: continue with  hirl-ray tune --resume {result.sweep_dir}")
    elif args.command == "report":
        from hirl_ray.sweep.report import write_report

        path = write_report(args.sweep_dir)
        print(f"Report written: {path}  (open file://{path})")
        if args.screenshot:
            from hirl_ray.sweep.report import screenshot

            print(f"Screenshot: {screenshot(path, path.parent / 'screenshot.png')}")
    else:
        from hirl_ray.sweep.dashboard import serve_dashboard

        serve_dashboard(args.sweep_dir, port=args.port)
    return 0


def _eval_overrides(items: list[str]) -> tuple[dict | None, dict]:
    """``data.*`` items → the ``data`` mapping; the others (``eval.params.*``) → overrides."""
    data, params = {}, {}
    for item in items:
        key, value = parse_override(item)
        if key.startswith("data."):
            data[key.removeprefix("data.")] = value
        else:
            params[key] = value
    return (data or None), params


def format_grouped(groups: dict[str, dict[str, float]], level_names: tuple[str, ...]) -> str:
    """Metrics per protocol: a table of ``<prefix>/<level>`` keys (one row per prefix, one
    column per label level), then the protocol's other keys."""
    lines = []
    for name, metrics in groups.items():
        lines.append(f"{name}:" if metrics else f"{name}: (no metrics)")
        rows: dict[str, dict[str, float]] = {}
        other = {}
        for key, value in metrics.items():
            prefix, _, level = key.rpartition("/")
            if level in level_names:
                rows.setdefault(prefix, {})[level] = value
            else:
                other[key] = value
        levels = [lvl for lvl in level_names if any(lvl in r for r in rows.values())]
        width = max([len(k) for k in (*rows, *other)] + [10]) + 2
        if rows:
            lines.append(" " * (2 + width) + "".join(f"{lvl:>14}" for lvl in levels))
        for prefix, row in rows.items():
            lines.append(f"  {prefix:<{width}}" + "".join(
                f"{row[lvl]:>14.4f}" if lvl in row else f"{'-':>14}" for lvl in levels))
        lines += [f"  {key:<{width}}{value:>14.4f}" for key, value in other.items()]
    return "\n".join(lines)


def _eval_main(args: argparse.Namespace) -> int:
    """``hirl-ray eval``: every protocol's metrics, a metrics JSON, optional plots."""
    from hirl_ray.api import evaluate_run

    data, overrides = _eval_overrides(list(args.overrides))
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()] \
        if args.protocols else None
    result, plots = evaluate_run(args.checkpoint, data, protocols, overrides, args.device,
                                 args.plots)
    print(f"Checkpoint  {result.checkpoint}")
    print(f"Data        {result.config.data.name}"
          + ("" if result.same_data else "  (not the run's training data)"))
    print(format_grouped(result.metrics, result.inputs.level_names))
    out = args.out or storage.join(result.run_dir or result.checkpoint, EVAL_METRICS)
    storage.write_text(out, json.dumps(redact(result.flat_metrics), indent=2, default=float))
    print(f"\nMetrics JSON  {out}")
    for path in plots:
        print(f"Plot          {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hirl-ray`` console script."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # "hirl-ray eval RUN --plots DIR knn.k=5": overrides after an option land in ``extra``.
    if extra and (args.command != "eval" or any(e.startswith("-") or "=" not in e
                                                for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    console()
    try:
        if args.command == "fit":
            from hirl_ray.api import fit, format_metrics

            # A YAML path is optional: "hirl-ray fit train.epochs=3" uses the default.
            config, overrides = args.config, list(args.overrides)
            if config is not None and "=" in config:
                config, overrides = None, [config, *overrides]
            result = fit(config, overrides)
            print("\nFinal metrics (frozen backbone, test split):")
            print(format_metrics(result.metrics))
            print(f"\nResults in        {result.run_dir}")
            print(f"Final checkpoint  {result.checkpoint_path}")
            print(f"Hierarchy         {result.hierarchy_path}")
            print(f"Metrics JSON      {LAYOUT.metrics_file(result.run_dir)}")
            print(f"Status            hirl-ray status {result.run_dir}")
            if storage.exists(LAYOUT.tensorboard_dir(result.run_dir)):
                print(f"TensorBoard       tensorboard --logdir "
                      f"{LAYOUT.tensorboard_dir(result.run_dir)}")
        elif args.command == "status":
            from hirl_ray.status import format_status, read_status, run_dir_of

            run = run_dir_of(args.run)
            if not storage.exists(run):
                raise FileNotFoundError(f"no run folder at {run}")
            print(format_status(run, read_status(run)))
        elif args.command in ("tune", "report", "dashboard"):
            return _tune_main(args)
        elif args.command == "eval":
            return _eval_main(args)
    except (ConfigError, FileNotFoundError, CheckpointError) as e:
        print(f"hirl-ray: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # train.on_nan, data.on_bad_file: the step or file, and the fix
        print(f"hirl-ray: error: {e.summary}", file=sys.stderr)
        return 1
    except Interrupted as e:  # SIGINT/SIGTERM: the epoch's checkpoint is saved
        print(f"hirl-ray: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second signal: stopped at once
        print("hirl-ray: stopped at once; saved epochs are kept and the current one is redone "
              "when the same command runs again", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
