"""Config loader: defaults, strictness, overrides, one-line errors before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hirl_ray.config import ConfigError, ExperimentConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_equals_embedded_default():
    assert load_config(ROOT / "experiments" / "default.yaml") == load_config(None)


def test_embedded_default_trains_hirl_with_two_workers():
    cfg = load_config(None)
    assert cfg.hirl.enabled and cfg.train.num_workers >= 2
    assert cfg.hirl.warmup_epochs < cfg.train.epochs


def test_hirl_defaults_are_the_official_choices():
    # hirl/pipelines/hirl.py: heads on inst_emb (projector output), runners: clustering on
    # forward_feature (key encoder), faiss.Clustering's default (random) init, per-sample mean.
    hirl = load_config(None).hirl
    assert (hirl.embedding, hirl.kmeans_init, hirl.neg_average) == (
        "projection", "random", "per_sample")
    for name in ("hirl_mocov2_resnet50", "hirl_simsiam_resnet50"):
        cfg = load_config(ROOT / "experiments" / "paper" / f"{name}.yaml")
        assert (cfg.hirl.embedding, cfg.hirl.kmeans_init, cfg.hirl.neg_average) == (
            "projection", "random", "per_sample")
        assert cfg.hirl.weight == 1.0 and cfg.hirl.rebuild_every_epochs == 1
        assert cfg.hirl.num_clusters == (30000, 10000, 1000) and cfg.hirl.num_neg_paths == 1000
        assert cfg.hirl.warmup_epochs == 20


def test_round_trip_through_dict():
    cfg = load_config(None, {"hirl.num_clusters": [30, 10], "train.lr": 0.1})
    assert load_config(cfg.to_dict()) == cfg
    assert cfg.hirl.num_clusters == (30, 10) and cfg.train.lr == 0.1


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.epoch": 3}, "unknown key train.epoch"),
    ({"trian": {"epochs": 3}}, "unknown section 'trian'"),
    ({"train.epochs": "ten"}, "train.epochs must be an integer"),
    ({"hirl.enabled": "yes"}, "hirl.enabled must be true or false"),
    ({"hirl.num_clusters": [100, 300, 30]}, "hirl.num_clusters must strictly decrease"),
    ({"hirl.num_clusters": []}, "hirl.num_clusters must list"),
    ({"hirl.num_clusters": 5}, "hirl.num_clusters must be a list"),
    ({"method.name": "moco"}, "method.name must be one of"),
    ({"train.gpus_per_worker": 1.5}, "train.gpus_per_worker must be a fraction <= 1"),
    ({"train.gpus_per_worker": 0}, "train.gpus_per_worker must be > 0"),
    ({"train.lr": 0}, "train.lr must be > 0"),
    ({"hirl.warmup_epochs": 10, "train.epochs": 10}, "hirl.warmup_epochs (10) must be <"),
    ({"data.name": "imagefolder"}, "data.root is required"),
    ({"hirl.embedding": "cls"}, "hirl.embedding must be one of projection, backbone, vit_cls"),
    ({"hirl.embedding": "vit_cls"}, "hirl.embedding=vit_cls needs a ViT backbone"),
    ({"hirl.embedding": "vit_mean", "model.backbone": "vit_tiny"},
     "hirl.embedding=vit_mean is not produced by method simclr"),
    ({"train.min_lr": 0.1}, "train.min_lr (0.1) must be <= train.lr"),
    ({"method.name": "dino", "method.augment": "dino"}, "method.augment must be one of simclr"),
    ({"model.drop_path": 1.0}, "model.drop_path must be in [0, 1)"),
    ({"hirl.kmeans_init": "afk-mc2"}, "hirl.kmeans_init must be one of random, kmeans++"),
    ({"hirl.neg_average": "mean"}, "hirl.neg_average must be one of per_sample, pooled"),
])
def test_bad_values_fail_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_cli_style_overrides_parse_yaml_values():
    assert parse_override("hirl.num_clusters=[30, 10]") == ("hirl.num_clusters", [30, 10])
    assert parse_override("train.use_gpu=true") == ("train.use_gpu", True)
    cfg = load_config(None, ["train.epochs=4", "storage.name=x"])
    assert cfg.train.epochs == 4 and cfg.storage.name == "x"
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.epochs")


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="unknown key train.bogus"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.train.epochs = 3  # type: ignore[misc]
    assert isinstance(cfg, ExperimentConfig)


@pytest.mark.parametrize(("override", "message"), [
    ("hirl.num_clusters=[5000,10]", "hirl.num_clusters[0]=5000 exceeds the 2400 training"),
    ("train.bogus=1", "unknown key train.bogus"),
    ("hirl.num_clusters=[10,30]", "strictly decrease"),
])
def test_cli_rejects_bad_config_before_ray_starts(tmp_path, override, message):
    proc = subprocess.run(
        [sys.executable, "-m", "hirl_ray.cli", "fit", str(ROOT / "experiments" / "default.yaml"),
         override, f"storage.path={tmp_path}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]
    # Nothing was created and Ray never started (no run folder, no Ray session line).
    assert not (tmp_path / "default").exists()
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_relative_data_root_is_made_absolute_at_load(tmp_path, monkeypatch):
    """Ray workers run in another directory: a relative local data.root must not reach them."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.name=npz", "data.root=data/set.npz"])
    assert cfg.data.root == str(tmp_path / "data" / "set.npz")
    assert load_config(cfg.to_dict()).data.root == cfg.data.root  # as a worker rebuilds it
    for kept in ("s3://bucket/set", "~/data/set.npz", "/abs/set.npz"):
        assert load_config(None, ["data.name=npz", f"data.root={kept}"]).data.root == kept
