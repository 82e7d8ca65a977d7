"""Benchmarks (issue #6): every module imports, the path-loss and rebuild benchmarks run at a
tiny size and write the documented JSON, and the fast loss paths they measure stay exact."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from experiments.bench import (
    bench_memory,
    bench_path_loss,
    bench_peer,
    bench_pipeline,
    bench_rebuild,
    run,
)
from experiments.bench.common import write_json
from hirl_ray.losses import semantic_path as loss_mod
from hirl_ray.losses.semantic_path import semantic_path_loss
from tests.path_loss_reference import semantic_path_loss_reference

MODULES = (
    "bench_path_loss",
    "bench_rebuild",
    "bench_memory",
    "bench_async",
    "bench_hirl_overhead",
    "bench_ray",
    "bench_peer",
    "bench_pipeline",
    "run",
    "common",
    "harness",
)
DOC_KEYS = {"bench", "quick", "machine", "params", "figures", "targets", "notes", "seconds"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports_and_benchmarks_have_run(name):
    module = importlib.import_module(f"experiments.bench.{name}")
    if name.startswith("bench_"):
        assert callable(module.run)


def test_path_loss_bench_tiny(tmp_path):
    # Level 0 (400 >= 16 * 21 paths) takes the sampled-matmul + embedding_bag path, level 1
    # (40 < 42) the dense one: both must agree with the official formulation.
    doc = bench_path_loss.run(shapes=[("paper", 8, 20, 16, (400, 40, 6))], repeats=1)
    assert DOC_KEYS <= set(doc)
    fig = doc["figures"]["paper"]
    for key in (
        "ours_s",
        "official_s",
        "speedup",
        "ours_peak_mb",
        "official_peak_mb",
        "memory_ratio",
        "loss_rel_diff",
        "grad_rel_diff",
    ):
        assert key in fig
    assert fig["loss_rel_diff"] <= 1e-5 and fig["grad_rel_diff"] <= 1e-5
    # The official formulation holds the (B, M, L, D) path tensor; the profiler must see it.
    assert fig["official_peak_mb"] >= fig["path_tensor_mb"]
    names = [t["name"] for t in doc["targets"]]
    assert "paper: speed-up vs official" in names
    assert "paper: peak-memory ratio vs official" in names
    path = write_json(doc, tmp_path / "pl.json")
    assert json.loads(path.read_text())["figures"]["paper"]["clusters"] == [400, 40, 6]


def test_rebuild_bench_tiny():
    doc = bench_rebuild.run(
        n=600,
        dim=8,
        ks=(20, 6, 2),
        niter=3,
        nredo=1,
        repeats=1,
        sklearn_repeats=1,
        scaling_n=(300, 600),
        scaling_niter=2,
    )
    assert DOC_KEYS <= set(doc)
    fig = doc["figures"]
    for key in (
        "ours_s",
        "bare_faiss_s",
        "sklearn_s",
        "ours_over_bare_faiss",
        "sklearn_over_ours",
        "scaling",
        "level0_assignment_agreement",
    ):
        assert key in fig
    assert [r["n"] for r in fig["scaling"]] == [300, 600]
    # Same seeds, iterations and seeding as bare faiss: (nearly) the same clustering.
    assert fig["level0_assignment_agreement"] > 0.9
    assert {t["name"] for t in doc["targets"]} == {
        "fit_hierarchy / bare faiss",
        "speed-up vs scikit-learn",
    }


@pytest.mark.parametrize("num_neg", [0, 3, 30])
def test_sampled_and_bag_paths_match_the_literal_reference(num_neg):
    # K_0 = 600 >= SAMPLED_FWD_RATIO * (1 + M): level 0 runs the sampled forward and the
    # embedding_bag backward; the other levels are dense. Duplicated negatives included.
    h = bench_path_loss.random_hierarchy((600, 120, 4), dim=8, num_samples=50, seed=1, device="cpu")
    assert 600 >= loss_mod.SAMPLED_FWD_RATIO * (1 + num_neg)
    g = torch.Generator().manual_seed(2)
    z = [F.normalize(torch.randn(5, 8, generator=g), dim=1).requires_grad_() for _ in range(3)]
    index = torch.tensor([0, 7, 7, 21, 49])

    def loss_and_grads(fn):
        loss = fn(z, index, h, num_neg, torch.Generator().manual_seed(3))
        return loss.detach(), torch.autograd.grad(loss, z)

    fast, fast_grads = loss_and_grads(semantic_path_loss)
    ref, ref_grads = loss_and_grads(semantic_path_loss_reference)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dense_and_bag_backward_agree(monkeypatch):
    h = bench_path_loss.random_hierarchy((300, 30, 3), dim=16, num_samples=40, seed=4, device="cpu")
    g = torch.Generator().manual_seed(5)
    z0 = [F.normalize(torch.randn(6, 16, generator=g), dim=1) for _ in range(3)]
    index = torch.arange(6)

    def grads():
        z = [a.clone().requires_grad_() for a in z0]
        loss = semantic_path_loss(z, index, h, 8, torch.Generator().manual_seed(0))
        return loss.detach(), torch.autograd.grad(loss, z)

    monkeypatch.setattr(loss_mod, "SAMPLED_FWD_RATIO", 1)  # sampled + bag on every level
    monkeypatch.setattr(loss_mod, "BAG_BWD_RATIO", 1)
    sparse_loss, sparse_grads = grads()
    monkeypatch.setattr(loss_mod, "SAMPLED_FWD_RATIO", 10**9)  # plain dense autograd
    monkeypatch.setattr(loss_mod, "BAG_BWD_RATIO", 10**9)
    dense_loss, dense_grads = grads()
    torch.testing.assert_close(sparse_loss, dense_loss, atol=1e-6, rtol=1e-6)
    for a, b in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.usefixtures("ray_session")
def test_memory_bench_tiny():
    # Shards from Ray tasks, each variant in its own actor; both must build the same hierarchy.
    doc = bench_memory.run(n=3000, dim=8, world=4, ks=(10, 4, 2), niter=2, nredo=1)
    assert DOC_KEYS <= set(doc)
    fig = doc["figures"]
    for variant in ("new", "old"):
        assert fig[variant]["samples"] >= 1 and fig[variant]["baseline_anon_bytes"] > 0
    assert fig["level0_assignment_agreement"] == 1.0
    assert fig["matrix_mb"] == 3000 * 8 * 4 / 1e6
    assert [t["name"] for t in doc["targets"]] == [
        "new: private peak / float32 matrix",
        "old / new private peak",
        "same hierarchy (level-0 agreement)",
    ]


def test_peak_sampler_sees_an_allocation():
    import numpy as np

    with bench_memory.PeakSampler(hz=200) as sampler:
        block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched; alive until the exit
    del block
    assert sampler.samples >= 1
    assert sampler.peak["RssAnon"] - sampler.baseline["RssAnon"] >= 60 * 2**20


def test_peer_bench_skips_cleanly_without_lightly(monkeypatch):
    monkeypatch.setattr(bench_peer, "lightly_available", lambda: None)
    doc = bench_peer.run(quick=True)
    assert "skipped" in doc["figures"] and "bench extra" in doc["notes"][0]
    assert doc["targets"][0]["met"] is None


def test_run_table_and_markdown_list_every_target():
    docs = {
        "x": {
            "targets": [
                {"name": "speed", "value": 31.5, "target": ">= 30", "met": True, "note": ""}
            ]
        },
        "y": {"error": "timed out after 900s", "targets": []},
    }
    rows = run.table(docs)
    assert [r["bench"] for r in rows] == ["x", "y"]
    md = run.markdown(
        rows,
        {"cpu": "cpu", "cores": 2, "memory_gb": 8, "gpu": None, "torch": "t", "faiss": "f"},
        quick=True,
    )
    assert "| x | speed | 31.5 | >= 30 | ✅ |" in md and "make bench-quick" in md


def test_pipeline_bench_tiny():
    """Issue 15: per-core images/s of each pipeline on JPEGs it writes, and cores per GPU."""
    doc = bench_pipeline.run(small=2, large=1, repeats=1)
    assert DOC_KEYS <= set(doc)
    ips = doc["figures"]["images_per_s"]
    for name in ("decode", "simclr before", "simclr +sep_blur", "dino before", "dino +sep_blur",
                 "gpu_decode"):
        assert ips["small"][name] > 0
    assert ips["large"]["simclr +sep_blur +draft"] > 0
    cores = doc["figures"]["cores_per_gpu"]
    assert cores["simclr +sep_blur"] > 0 and "A100" in doc["figures"]["gpu_source"]
