"""A fit's key figures as ``ray.util.metrics`` gauges and counters (rank 0).

They appear in the Ray dashboard's metrics view and on every node's Prometheus endpoint
(Ray prefixes them with ``ray_``: ``ray_hirl_ray_loss``), tagged with the run name; the
prototype actor adds its rebuild metrics (:class:`~hirl_ray.hierarchy.actor.RebuildMetrics`).
Names: README "Watching a run".
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.util.metrics import Counter, Gauge

#: Observer key → gauge name (``hirl_ray_`` + the key with ``/`` as ``_``).
GAUGES = {
    "loss/total": "hirl_ray_loss", "loss/ssl": "hirl_ray_ssl_loss",
    "loss/semantic": "hirl_ray_semantic_loss", "lr": "hirl_ray_lr",
    "grad_norm": "hirl_ray_grad_norm",
    "throughput/epoch_samples_per_s": "hirl_ray_samples_per_second",
    "hierarchy/version": "hirl_ray_hierarchy_version", "epoch/epoch": "hirl_ray_epoch",
    "rebuild/seconds": "hirl_ray_last_rebuild_seconds",
}


class TrainMetrics:
    """The worker's gauges (:data:`GAUGES`) and its epoch counter; a ``RunObserver`` sink."""

    def __init__(self, run_name: str) -> None:
        self.tags = {"run": run_name}
        self.gauges = {key: Gauge(name, description=f"hirl_ray fit: {key}", tag_keys=("run",))
                       for key, name in GAUGES.items()}
        self.epochs = Counter("hirl_ray_epochs_total", description="Epochs trained.",
                              tag_keys=("run",))

    def __call__(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            gauge = self.gauges.get(key)
            if gauge is not None and value == value:
                gauge.set(float(value), tags=self.tags)
        if "epoch/epoch" in values:
            self.epochs.inc(1, tags=self.tags)
