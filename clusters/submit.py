"""Run `hirl-ray fit|tune …` on the head of a running Ray cluster.

Used by Ray's cluster launcher, which copies this file to the head node and runs it there:

    ray submit clusters/aws.yaml clusters/submit.py fit experiments/paper/hirl_mocov2_resnet50.yaml \
        storage.path=s3://YOUR-BUCKET/hirl

It connects to the cluster (``RAY_ADDRESS``, default ``auto``), so the Ray Train workers and
the prototype actor are scheduled on the cluster's worker nodes. Experiment paths are looked
up in the current folder, then in the repository copy that ``clusters/aws.yaml`` mounts
(``HIRL_RAY_HOME``, default ``/home/ray/hirl_ray``). Without a ``storage.path=…`` override,
``$HIRL_STORAGE`` (set by the cluster's setup commands) is used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    os.environ.setdefault("RAY_ADDRESS", "auto")
    home = Path(os.environ.get("HIRL_RAY_HOME", "/home/ray/hirl_ray"))
    args = list(argv)
    for i, arg in enumerate(args):
        if arg.endswith((".yaml", ".yml")) and not Path(arg).exists() and (home / arg).exists():
            args[i] = str(home / arg)
    if os.environ.get("HIRL_STORAGE") and args and args[0] in ("fit", "tune") \
            and not any(a.startswith("storage.path=") for a in args):
        args.append(f"storage.path={os.environ['HIRL_STORAGE']}")
    from hirl_ray.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
