"""Node-loss scenario, run in its own process by test_fault_tolerance.py.

A 2-node Ray cluster on 127.0.0.1 (plus a head with no CPUs) runs a 2-worker fit, one
worker per node. Once epoch 2's checkpoint exists, the node of one worker is killed
(no graceful shutdown) and a replacement node joins, as an autoscaler would add one.
Prints one JSON line describing what happened.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def main(tmp: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    import hirl_ray
    from hirl_ray.train.checkpoint import find_checkpoints, read_meta

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="hirl_ray", logging_level="WARNING")
    overrides = {
        "data.train_per_class": 10, "data.test_per_class": 5, "model.width": 16,
        "method.hidden_dim": 64, "method.proj_dim": 32, "hirl.num_clusters": [12, 4],
        "hirl.warmup_epochs": 1, "hirl.rebuild_every_epochs": 1, "hirl.num_neg_paths": 16,
        "hirl.kmeans_nredo": 1, "hirl.kmeans_iters": 10, "train.epochs": 6,
        "train.batch_size": 32, "train.num_workers": 2, "train.max_failures": 3,
        "storage.path": tmp, "storage.name": "run",
    }
    run = Path(tmp) / "run"
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = hirl_ray.fit(None, overrides)
        except BaseException as e:  # reported in the JSON line
            outcome["error"] = repr(e)

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "train" / "epoch_0002" / "meta.json").exists():
        time.sleep(0.2)
    before = {p: Path(p, "state.pt").stat().st_mtime_ns for p in find_checkpoints(run)}
    killed_at = max(read_meta(p).epoch for p in before)
    cluster.remove_node(nodes[1], allow_graceful=False)
    cluster.add_node(num_cpus=1)
    thread.join(timeout=600)
    after = find_checkpoints(run)
    metas = {read_meta(p).epoch: read_meta(p) for p in after}
    steps_per_epoch = metas[2].step - metas[1].step
    print(json.dumps({
        "error": outcome.get("error"),
        "killed_after_epoch": killed_at,
        "epochs": sorted(metas),
        # A checkpoint written before the kill and rewritten (or gone) after it was lost/redone.
        "checkpoints_lost": sum(1 for p in before if not Path(p, "meta.json").exists()),
        "checkpoints_rewritten": sum(1 for p, t in before.items()
                                     if Path(p, "state.pt").stat().st_mtime_ns != t),
        "step_continuity": all(metas[e + 1].step - metas[e].step == steps_per_epoch
                               for e in sorted(metas)[:-1]),
        "final_epoch": max(metas),
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
