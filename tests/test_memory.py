"""Rebuild memory estimate: checked against the actor's node before training, not an OOM after
hours; and it follows the one-matrix rebuild path."""

from __future__ import annotations

import logging
import time

import pytest

from hirl_ray.config import ConfigError
from hirl_ray.hierarchy.memory import (
    RebuildMemory,
    check_rebuild_memory,
    node_memory_bytes,
    rebuild_bytes,
    rebuild_estimate,
)

IMAGENET = 1_281_167
PAPER_KS = [30000, 10000, 1000]


def test_estimate_grows_with_samples_dims_and_clusters():
    base = rebuild_bytes(10_000, 128, [100, 10])
    assert rebuild_bytes(20_000, 128, [100, 10]) > 1.9 * base
    assert rebuild_bytes(10_000, 256, [100, 10]) > base
    assert rebuild_bytes(10_000, 128, [5000, 10]) > base
    # More ranks, smaller shards: only one shard is in flight at a time.
    assert rebuild_bytes(10_000, 128, [100, 10], num_shards=8) < base


def test_imagenet_estimate_is_about_one_float32_matrix():
    for dim in (128, 2048):
        est = rebuild_estimate(IMAGENET, dim, PAPER_KS, num_shards=8)
        matrix = IMAGENET * dim * 4
        assert est.matrix == matrix
        # The old path held ~14 bytes per element (3.5 matrices); the new one stays near one.
        assert matrix < est.total < 1.5 * matrix, est.describe()
    assert rebuild_estimate(IMAGENET, 2048, PAPER_KS).total > 10 * 2**30


def test_check_warns_raises_and_names_the_node_and_the_fix():
    need = rebuild_estimate(IMAGENET, 2048, PAPER_KS, num_shards=8)
    assert check_rebuild_memory(need, 128 * 2**30, "node a") is None
    assert check_rebuild_memory(need, None, "node a") is None  # unknown memory: nothing to say
    text = check_rebuild_memory(need, int(need.total / 0.8), "this machine (local Ray)")
    assert text is not None and "\n" not in text
    assert "this machine (local Ray)" in text and "hirl.num_clusters" in text and "actor" in text
    with pytest.raises(ConfigError, match="node ip-10-0-0-7"):
        check_rebuild_memory(need, 8 * 2**30, "node ip-10-0-0-7 (10.0.0.7)")


def test_node_memory_is_positive_and_at_most_physical():
    import os

    total = node_memory_bytes()
    assert total is not None and 0 < total <= os.sysconf("SC_PAGE_SIZE") * os.sysconf(
        "SC_PHYS_PAGES"
    )


def test_describe_lists_every_part():
    text = RebuildMemory(matrix=2**30, shard=0, per_point=2**29, centroids=0).describe()
    assert text.startswith("1.5 GiB") and "float32 matrix 1.00" in text


@pytest.mark.usefixtures("ray_session")
def test_actor_node_check_names_the_actors_node(ray_session, tmp_path, caplog):
    from hirl_ray.hierarchy.actor import ActorSettings, start_actor
    from hirl_ray.train.ray_fit import check_actor_node_memory

    ray = ray_session
    settings = ActorSettings(snapshot_dir=str(tmp_path), num_clusters=(4, 2), num_samples=10)
    actor = start_actor(f"test-memory-{time.time_ns()}", settings)
    try:
        total = node_memory_bytes()
        assert total is not None
        small = RebuildMemory(matrix=1, shard=0, per_point=0, centroids=0)
        with caplog.at_level(logging.WARNING, logger="hirl_ray"):
            check_actor_node_memory(actor, small, timeout_s=60)
        assert not caplog.records
        tight = RebuildMemory(matrix=int(0.9 * total), shard=0, per_point=0, centroids=0)
        with caplog.at_level(logging.WARNING, logger="hirl_ray"):
            check_actor_node_memory(actor, tight, timeout_s=60)
        [record] = caplog.records
        assert record.levelno == logging.WARNING
        assert "prototype actor's node, node " in record.getMessage()
        with pytest.raises(ConfigError, match="prototype actor's node"):
            check_actor_node_memory(
                actor, RebuildMemory(matrix=2 * total, shard=0, per_point=0, centroids=0)
            )
    finally:
        ray.kill(actor)


def test_preflight_checks_this_machine_only_for_a_local_ray(tmp_path, monkeypatch, caplog):
    from hirl_ray import runs
    from hirl_ray.config import load_config

    from .conftest import tiny_config

    cfg = load_config(None, tiny_config(tmp_path))
    need = runs.rebuild_memory(cfg, 100)
    assert need.matrix == 100 * runs.feature_dim(cfg) * 4
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    n = runs.check_data(cfg)
    need = runs.rebuild_memory(cfg, n)
    monkeypatch.setattr(runs, "node_memory_bytes", lambda: int(need.total / 0.8))
    with caplog.at_level(logging.WARNING, logger="hirl_ray"):
        runs.check_data(cfg)
    assert [r.name for r in caplog.records] == ["hirl_ray.runs"]
    assert "this machine (local Ray)" in caplog.records[0].getMessage()
    monkeypatch.setattr(runs, "node_memory_bytes", lambda: need.total // 2)
    with pytest.raises(ConfigError, match="this machine"):
        runs.check_data(cfg)
    # Joining a cluster the actor's node is unknown here: train_on_ray checks it there.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hirl_ray"):
        runs.check_data(cfg)
    assert not caplog.records
