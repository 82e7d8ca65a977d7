"""A short Ray fit is observable (issue 16): TensorBoard events (step and epoch scalars, the
prototype tree), the Ray metrics on the node's Prometheus endpoint, and status.json."""

from __future__ import annotations

import importlib.util
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import hirl_ray
from hirl_ray import status as run_status

from .conftest import tiny_config

torch.set_num_threads(1)


def _metrics_text() -> str:
    """This node's Prometheus metrics (Ray's metrics agent, also without the dashboard)."""
    import ray

    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    return urllib.request.urlopen(url, timeout=10).read().decode()


def _values(text: str, run: str) -> dict[str, float]:
    """``{name: value}`` of the ``ray_hirl_ray_*{run=...}`` samples in ``text``."""
    out = {}
    for line in text.splitlines():
        if line.startswith("ray_hirl_ray_") and f'run="{run}"' in line:
            out[line.split("{", 1)[0].removeprefix("ray_")] = float(line.rsplit(" ", 1)[1])
    return out


class Scraper(threading.Thread):
    """Polls the metrics endpoint while the fit runs: gauges of a process are exported only
    while it lives (counters and histograms stay)."""

    def __init__(self, run: str) -> None:
        super().__init__(daemon=True)
        self.run_name, self.seen, self.done = run, {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(2.0):  # polling interval, not an assertion
            try:
                self.seen.update(_values(_metrics_text(), self.run_name))
            except OSError:
                pass


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_fit_writes_tensorboard_ray_metrics_and_status(tmp_path, capsys, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # MLflow too when installed (extra [mlflow]; in the test extras): a sqlite store here.
    mlflow_uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow_on = {"observe.mlflow": True, "observe.mlflow_uri": mlflow_uri} \
        if importlib.util.find_spec("mlflow") else {}
    # W&B too when installed (extra [wandb]), offline: the driver's WANDB_MODE reaches rank 0.
    wandb_on = {"observe.wandb": True} if importlib.util.find_spec("wandb") else {}
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    scraper = Scraper("watched")
    scraper.start()
    try:
        result = hirl_ray.fit(None, tiny_config(tmp_path, **{
            "observe.every_steps": 1, "storage.name": "watched",
            "train.progress_every_steps": 1, **mlflow_on, **wandb_on}))
    finally:
        scraper.done.set()
        scraper.join()
    run = Path(result.run_dir)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/ssl", "lr", "grad_norm", "time/data_wait_s",
            "throughput/samples_per_s"} <= scalars
    assert {"epoch/loss", "epoch/semantic_loss", "hierarchy/version", "hierarchy/level0/empty",
            "hierarchy/level1/clusters", "rebuild/seconds", "rebuild/gather_s",
            "rebuild/level0_s", "rebuild/publish_s"} <= scalars
    assert [e.step for e in acc.Scalars("epoch/loss")] == [1, 2, 3]
    assert len(acc.Scalars("loss/total")) >= 3 * 2  # every step (2 steps an epoch at least)
    assert "loss/semantic" in scalars  # HIRL ran after the warm-up
    assert acc.Images("hierarchy/prototype_tree")[0].encoded_image_string[:4] == b"\x89PNG"
    if mlflow_on:  # the same curves in the MLflow run, which ended FINISHED
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
        (run_info,) = client.search_runs(
            [client.get_experiment_by_name("hirl_ray").experiment_id])
        assert run_info.info.status == "FINISHED" and run_info.info.run_name == "watched"
        steps = [m.step for m in client.get_metric_history(run_info.info.run_id, "epoch/loss")]
        assert steps == [1, 2, 3]
        assert len(client.get_metric_history(run_info.info.run_id, "loss/total")) == \
            len(acc.Scalars("loss/total"))
        assert client.list_artifacts(run_info.info.run_id, "hierarchy")
        assert run_info.data.params["hirl.num_clusters"] == "[12, 4]"
    if wandb_on:  # the same curves in the offline W&B run, which exited 0
        from .test_wandb import WandbRun

        (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
        wb = WandbRun([wandb_file])
        assert wb.exit_codes == [0] and wb.name == "watched"
        assert [e for e, _ in wb.curve("epoch/loss", "epoch")] == [1, 2, 3]
        assert [v for _, v in wb.curve("epoch/loss", "epoch")] == \
            pytest.approx([e.value for e in acc.Scalars("epoch/loss")])
        assert [s for s, _ in wb.curve("loss/total", "global_step")] == \
            [e.step for e in acc.Scalars("loss/total")]
        assert any("hierarchy/prototype_tree" in row for row in wb.rows)
        assert wb.config["hirl"]["num_clusters"] == [12, 4]

    status = run_status.read_status(str(run))
    assert status["state"] == "finished" and status["epoch"] == 3
    assert status["last_checkpoint"] == "epoch_0003"
    assert status["last_rebuild"]["version"] >= 1
    assert {"gather", "level0", "level1", "publish"} <= set(status["last_rebuild"]["phases"])

    # Gauges while the workers lived; counters and histograms also after.
    assert {"hirl_ray_loss", "hirl_ray_lr", "hirl_ray_samples_per_second", "hirl_ray_epoch",
            "hirl_ray_hierarchy_version"} <= set(scraper.seen), scraper.seen
    assert scraper.seen["hirl_ray_samples_per_second"] > 0
    deadline, after = time.monotonic() + 60, {}
    while time.monotonic() < deadline and after.get("hirl_ray_epochs_total") != 3.0:
        after = _values(_metrics_text(), "watched")
        time.sleep(1.0)  # polling interval, not an assertion
    assert after.get("hirl_ray_epochs_total") == 3.0, after
    assert after["hirl_ray_rebuilds_total"] >= 1 and after["hirl_ray_rebuild_seconds_count"] >= 1
