"""Shared fixtures: one local Ray per test session (2 CPUs, like CI)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HIRL_RAY_DASHBOARD", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
torch.set_num_threads(1)


S3_SECRET = "hirlTestSecretKey0123456789"


@pytest.fixture(autouse=True)
def _hirl_ray_records_reach_caplog():
    """``hirl_ray.fit``/``tune`` call ``logs.console()``, which stops the ``hirl_ray`` logger
    propagating (no doubled lines in applications); a later test's ``caplog`` (a handler on
    the root logger) must still see its records."""
    logging.getLogger("hirl_ray").propagate = True


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto server) on 127.0.0.1 with fake credentials.

    Started before Ray so that every Ray process inherits ``AWS_ENDPOINT_URL``.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="hirltestkeyid", AWS_SECRET_ACCESS_KEY=S3_SECRET,
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://{host}:{port}")
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A local Ray with 2 CPUs shared by every Ray test in the session."""
    import ray

    if not ray.is_initialized():
        _init_test_ray(ray)
    yield ray
    ray.shutdown()


def _init_test_ray(ray) -> None:
    """A local Ray started by address, like hirl_ray's own: its tasks never guess among the
    other Ray instances on the machine (a test's subprocess sweep, say)."""
    from hirl_ray.train.ray_cluster import connect

    given = os.environ.pop("RAY_ADDRESS", None)  # the tests' Ray is always a local one
    try:
        connect(num_cpus=2, dashboard=False)
    finally:
        if given is not None:
            os.environ["RAY_ADDRESS"] = given


@pytest.fixture(scope="module")
def fresh_ray(ray_session):
    """The session's Ray, restarted for this module.

    After a couple of hundred tests in one driver process, the first fit against S3 sometimes
    stopped receiving actor-state notifications from the GCS (its prototype actor and Train
    controller never seen ALIVE by the driver, so the fit waits forever). Not reproduced with a
    fresh driver; until the cause in Ray is found, the S3 fits get one.
    """
    ray_session.shutdown()
    _init_test_ray(ray_session)
    yield ray_session


def tiny_config(tmp_path, **overrides):
    """Overrides for a fit that runs in well under a minute on 2 CPUs."""
    base = {
        "data.train_per_class": 10, "data.test_per_class": 5,
        "model.width": 16, "method.hidden_dim": 64, "method.proj_dim": 32,
        "hirl.num_clusters": [12, 4], "hirl.warmup_epochs": 1, "hirl.rebuild_every_epochs": 1,
        "hirl.num_neg_paths": 16, "hirl.kmeans_nredo": 1, "hirl.kmeans_iters": 10,
        "train.epochs": 3, "train.batch_size": 32, "train.num_workers": 2,
        "storage.path": str(tmp_path), "storage.name": "run",
    }
    base.update(overrides)
    return base
