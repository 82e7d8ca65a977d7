"""Cluster artefacts: the launcher config, the KubeRay job, and the submit paths."""

from __future__ import annotations

import copy
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from hirl_ray.config import load_config
from hirl_ray.train.checkpoint import find_checkpoints, read_meta

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _launcher_validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_aws_yaml_passes_ray_launcher_validation():
    config = yaml.safe_load((ROOT / "clusters" / "aws.yaml").read_text())
    _launcher_validate(config)
    for name, node in config["available_node_types"].items():
        # S3 access through an instance profile on every node type (ray #3115, #18186).
        assert "IamInstanceProfile" in node["node_config"], name
    text = (ROOT / "clusters" / "aws.yaml").read_text()
    assert "aws_access_key_id" not in text.lower() and "aws_secret" not in text.lower()
    assert any("[gpu]" in c for c in config["setup_commands"])


def test_broken_aws_yaml_is_rejected():
    import jsonschema

    config = yaml.safe_load((ROOT / "clusters" / "aws.yaml").read_text())
    config["available_node_types"]["head"]["instance_typo"] = "m5.large"
    with pytest.raises(jsonschema.ValidationError):
        _launcher_validate(config)


def test_kuberay_job_runs_an_existing_experiment():
    job = yaml.safe_load((ROOT / "clusters" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["hirl-ray", "fit"]
    experiment = ROOT / argv[2].replace("/home/ray/hirl_ray/", "")
    cfg = load_config(experiment, argv[3:])
    assert cfg.storage.path.startswith("s3://")


TINY = ["data.train_per_class=10", "data.test_per_class=5", "model.width=16",
        "method.hidden_dim=64", "method.proj_dim=32", "hirl.num_clusters=[12,4]",
        "hirl.warmup_epochs=1", "hirl.rebuild_every_epochs=1", "hirl.kmeans_nredo=1",
        "train.epochs=2", "train.batch_size=32", "train.num_workers=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_submit_script_and_ray_job_submit_against_a_running_cluster(tmp_path):
    """The README's cluster commands, run against a local `ray start --head` cluster."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
           "RAY_DEDUP_LOGS": "1", "HIRL_RAY_HOME": str(ROOT),
           # A throwaway loopback cluster: no token (real clusters keep Ray's token auth).
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(VENV_BIN / "ray")
    # `--block` ties the cluster's processes to this one; killing its process group stops
    # exactly this cluster (`ray stop` would stop every Ray on the machine).
    # Its own agent port: the session's Ray already listens on the default one.
    # Ports chosen free now: another Ray on this machine (a sweep, another test run) may hold any
    # fixed one, and a job would then land on that cluster.
    gcs_port, dashboard_port = _free_port(), _free_port()
    address = f"127.0.0.1:{gcs_port}"
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--num-cpus=2",
                             f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
                             "--disable-usage-stats",
                             f"--dashboard-agent-listen-port={_free_port()}",
                             f"--temp-dir={tempfile.mkdtemp(prefix='ray', dir='/tmp')}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        up = subprocess.run([ray_bin, "status", "--address", address],
                            capture_output=True, env=env, timeout=60)
        if up.returncode == 0:
            break
        assert head.poll() is None, "ray start --head exited"
        time.sleep(1)
    try:
        # What `ray submit clusters/aws.yaml clusters/submit.py fit …` runs on the head node
        # (there RAY_ADDRESS defaults to auto; here the test names its own cluster).
        env["RAY_ADDRESS"] = address
        sub = subprocess.run(
            [sys.executable, str(ROOT / "clusters" / "submit.py"), "fit",
             "experiments/default.yaml", *TINY, f"storage.path={tmp_path}",
             "storage.name=submitted"], capture_output=True, text=True, env=env,
            timeout=600, cwd=tmp_path)
        assert sub.returncode == 0, (sub.stdout + sub.stderr)[-3000:]
        assert [read_meta(p).epoch for p in find_checkpoints(tmp_path / "submitted")] == [1, 2]
        # `ray job submit --working-dir . -- hirl-ray fit …` against the same cluster.
        for _ in range(30):  # the dashboard's job agent may still be starting
            job = subprocess.run(
                [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}",
                 "--working-dir", ".", "--", "hirl-ray", "fit", "experiments/default.yaml",
                 *TINY, f"storage.path={tmp_path}", "storage.name=job"],
                capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
            if "No available agent to submit job" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
        assert "knn_acc/superclass" in metrics
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
