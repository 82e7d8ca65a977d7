"""Command line: ``hirl-ray fit|eval|tune|report|dashboard experiments/x.yaml key=value ...``."""

from __future__ import annotations

import argparse
import json
import sys

from hirl_ray.config import ConfigError
from hirl_ray.logs import console
from hirl_ray.runs import LAYOUT


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hirl-ray", description="HIRL pretraining on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="pretrain (resumes the run folder if it has checkpoints)")
    fit.add_argument("config", nargs="?", default=None,
                     help="experiment YAML (default: the embedded default experiment)")
    fit.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5")
    ev = sub.add_parser("eval", help="evaluate a checkpoint or run folder (kNN, NMI per level)")
    ev.add_argument("checkpoint",
                    help=f"a run folder or one of its {LAYOUT.train}/epoch_* folders")
    ev.add_argument("--device", default="cpu")
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hirl-ray`` console script."""
    args = _parser().parse_args(argv)
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
        elif args.command in ("tune", "report", "dashboard"):
            return _tune_main(args)
        elif args.command == "eval":
            from hirl_ray.eval.checkpoint import evaluate_checkpoint, resolve_checkpoint

            path = resolve_checkpoint(args.checkpoint)
            run_dir = LAYOUT.run_of_checkpoint(path)
            hierarchy = LAYOUT.hierarchy_dir(run_dir) if run_dir else None
            metrics = evaluate_checkpoint(path, hierarchy, args.device)
            print(json.dumps(metrics, indent=2))
    except (ConfigError, FileNotFoundError) as e:
        print(f"hirl-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
