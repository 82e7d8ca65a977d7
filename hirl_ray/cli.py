"""Command line: ``hirl-ray fit|eval experiments/x.yaml key=value ...``."""

from __future__ import annotations

import argparse
import json
import sys

from hirl_ray.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hirl-ray", description="HIRL pretraining on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="pretrain (resumes the run folder if it has checkpoints)")
    fit.add_argument("config", nargs="?", default=None,
                     help="experiment YAML (default: the embedded default experiment)")
    fit.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5")
    ev = sub.add_parser("eval", help="evaluate a checkpoint or run folder (kNN, NMI per level)")
    ev.add_argument("checkpoint", help="a run folder or one of its train/epoch_* folders")
    ev.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hirl-ray`` console script."""
    args = _parser().parse_args(argv)
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
            print(f"Metrics JSON      {result.run_dir}/metrics.json")
        elif args.command == "eval":
            from hirl_ray import storage
            from hirl_ray.train.evaluate import evaluate_checkpoint, resolve_checkpoint

            path = resolve_checkpoint(args.checkpoint)
            run_dir = path.rstrip("/").rsplit("/", 2)[0]  # <run>/train/epoch_NNNN
            metrics = evaluate_checkpoint(path, storage.join(run_dir, "hierarchy"), args.device)
            print(json.dumps(metrics, indent=2))
    except (ConfigError, FileNotFoundError) as e:
        print(f"hirl-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
