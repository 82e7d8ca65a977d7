"""``observe.mlflow``: a fit's curves, tree picture and config in an MLflow run (issue 16).

A real MLflow tracking store (sqlite in the test's folder, MLflow's own client to read back);
the Ray fit that writes one is in ``test_observe_ray.py``.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from hirl_ray.config import ConfigError, load_config
from hirl_ray.logs import REDACTED
from hirl_ray.runs import LAYOUT
from hirl_ray.train.mlflow_log import MlflowLog, check_mlflow, flat_params
from hirl_ray.train.observe import RunObserver

from .test_observe import FakeClock, _hierarchy, _stats, _step, _warnings_while_down

mlflow = pytest.importorskip("mlflow")


def _cfg(tmp_path, name="run", **overrides):
    return load_config(None, {"storage.path": str(tmp_path), "storage.name": name,
                              "train.epochs": 4, "observe.every_steps": 2, "observe.mlflow": True,
                              "observe.mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db",
                              "observe.tensorboard": False, **overrides})



def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_the_observer_writes_step_and_epoch_scalars_the_tree_and_the_redacted_config(
        tmp_path, monkeypatch):
    secret = "s3cr3t-value-Zq81"
    monkeypatch.setenv("HIRL_TEST_TOKEN", secret)  # any *_TOKEN value is a secret
    cfg = _cfg(tmp_path, name=f"run-{secret}")
    check_mlflow(cfg)  # creates the experiment
    clock = FakeClock()
    board = MlflowLog(cfg, cfg.run_dir)
    obs = RunObserver(cfg, cfg.run_dir, world=2, hierarchy=lambda: "v1", clock=clock,
                      boards=[board])
    h, feats = _hierarchy()
    obs.begin_epoch(0, 4)
    for i in range(1, 5):
        clock.now += 1.0
        obs.on_step(_step(i, 2.0 - i / 10))
    from hirl_ray.eval.plots import prototype_tree_figure

    images = torch.randint(0, 255, (60, 3, 8, 8), dtype=torch.uint8)
    obs.end_epoch(_stats(0), 4, {"loss": 1.5, "knn_acc/class": 0.4, "hirl_active": True},
                  hierarchy=h, rebuild=None, checkpoint="epoch_0001",
                  tree=lambda hh: prototype_tree_figure(hh, feats, range(60),
                                                        lambda i: images[i], "tree"))
    obs.close("finished")

    client = mlflow.MlflowClient(tracking_uri=cfg.observe.mlflow_uri)
    saved = json.loads((tmp_path / f"run-{secret}" / LAYOUT.mlflow).read_text())
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "hirl_ray"
    # Step scalars every observe.every_steps steps (x: global step); epoch ones (x: epoch).
    assert _history(client, run.info.run_id, "loss/total") == \
        [(2, pytest.approx(1.8)), (4, pytest.approx(1.6))]
    assert _history(client, run.info.run_id, "grad_norm") == [(2, 2.0), (4, 2.0)]
    assert _history(client, run.info.run_id, "epoch/knn_acc/class") == [(1, 0.4)]
    assert "epoch/hirl_active" not in run.data.metrics  # booleans are not curves
    assert run.data.metrics["hierarchy/level0/clusters"] == 6
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "hierarchy")]
    assert artifacts == ["hierarchy/prototype_tree_v0001.png"]
    # Beside the sqlite file, not in ./mlruns of whichever process logged it.
    assert [p.name for p in (tmp_path / "mlartifacts").rglob("*.png")] == \
        ["prototype_tree_v0001.png"]
    # The config as parameters, secrets redacted (in the parameters and the tags).
    params = run.data.params
    assert params["hirl.num_clusters"] == json.dumps(list(cfg.hirl.num_clusters))
    assert params["method.name"] == cfg.method.name and params["observe.mlflow"] == "true"
    assert params["storage.name"] == f"run-{REDACTED}"
    assert secret not in json.dumps([params, run.data.tags])
    # status.json and `hirl-ray status` say where the run is.
    status = json.loads((tmp_path / f"run-{secret}" / "status.json").read_text())
    assert status["mlflow"].endswith(f"run {run.info.run_id}")


def test_a_resumed_fit_continues_its_mlflow_run(tmp_path):
    cfg = _cfg(tmp_path)
    first = MlflowLog(cfg, cfg.run_dir)
    first.scalars({"loss/total": 3.0}, 1)
    first.close("stopped")
    client = mlflow.MlflowClient(tracking_uri=cfg.observe.mlflow_uri)
    assert client.get_run(first.run_id).info.status == "KILLED"
    again = MlflowLog(cfg, cfg.run_dir)  # the rerun (or Ray's restart of rank 0)
    assert again.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    again.scalars({"loss/total": 2.0, "lr": float("nan"), "ok": True}, 2)
    again.close("failed")
    run = client.get_run(first.run_id)
    assert run.info.status == "FAILED"
    assert _history(client, run.info.run_id, "loss/total") == [(1, 3.0), (2, 2.0)]
    assert set(run.data.metrics) == {"loss/total"}  # NaN and booleans left out
    # Another tracking store knows nothing of that run: a new one, with a warning.
    other = load_config(cfg, {"observe.mlflow_uri": f"sqlite:///{tmp_path}/other.db"})
    assert MlflowLog(other, cfg.run_dir).run_id != first.run_id


def test_a_failing_tracking_server_costs_one_warning_not_the_run(tmp_path, monkeypatch, caplog):
    cfg = _cfg(tmp_path)
    board = MlflowLog(cfg, cfg.run_dir)
    warned = _warnings_while_down(board, board.client, "log_batch", {"loss/total": 1.0},
                                  monkeypatch, caplog, "MLflow: could not log metrics")
    assert len(warned) == 1 and "training goes on" in warned[0]


def test_flat_params_of_a_nested_config():
    assert flat_params({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x", "f": None, "g": {}}) == \
        {"a.b": "1", "a.c.d": "[1, 2]", "e": "x", "f": "null", "g": "{}"}


def test_checks_before_ray_name_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_mlflow(load_config(None, {}))  # off: nothing asked of MLflow
    with pytest.raises(ConfigError, match=r"^observe.mlflow is on but no tracking URI"):
        check_mlflow(load_config(None, {"observe.mlflow": True}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    check_mlflow(load_config(None, {"observe.mlflow": True}))  # the environment's URI
    assert (tmp_path / "env.db").exists()
    with pytest.raises(ConfigError, match=r"^observe.mlflow_experiment must not be empty"):
        load_config(None, {"observe.mlflow": True, "observe.mlflow_experiment": ""})
    # A server that does not answer (a closed port), quickly: no retries for this test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ConfigError, match=rf"^observe.mlflow_uri=http://u:{re.escape(REDACTED)}"
                                              rf"@127.0.0.1:{port}: MLflow did not answer"):
            check_mlflow(load_config(None, {"observe.mlflow": True, "observe.mlflow_uri":
                                            f"http://u:pw12345678@127.0.0.1:{port}"}))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed
    with pytest.raises(ConfigError, match=r"mlflow package is not installed: pip install "
                                          r"'hirl_ray\[mlflow\]'"):
        check_mlflow(load_config(None, {"observe.mlflow": True}))
