"""End to end on Ray: 2-worker fit with the prototype actor, resume, load_backbone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hirl_ray
from hirl_ray.train.checkpoint import find_checkpoints, read_meta

from .conftest import tiny_config


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_two_worker_fit_then_resume_continues_epoch_and_hierarchy(tmp_path):
    result = hirl_ray.fit(None, tiny_config(tmp_path))
    assert isinstance(result, hirl_ray.FitResult)  # the one result type (hirl_ray.runs)
    run = Path(result.run_dir)
    first = find_checkpoints(run)
    assert [read_meta(p).epoch for p in first] == [1, 2, 3]
    metas = [read_meta(p) for p in first]
    # Warm-up of 1 epoch, rebuild every epoch: the actor built hierarchies, and HIRL ran.
    assert metas[-1].hierarchy_version >= 1
    assert any(m.metrics["hirl_active"] for m in metas)
    assert result.hierarchy_path and Path(result.hierarchy_path).is_file()
    # The sweep report's tree picture embeds images where k-means ran (hirl.embedding).
    from hirl_ray.sweep.tree import prototype_tree

    assert prototype_tree(run, result.checkpoint_path, tmp_path / "tree.png").is_file()
    for level in ("subclass", "class", "superclass"):
        assert 0.0 <= result.metrics[f"knn_acc/{level}"] <= 1.0
        assert f"nmi/{level}" in result.metrics
    assert json.loads((run / "metrics.json").read_text())["knn_acc/superclass"] == \
        result.metrics["knn_acc/superclass"]
    mtimes = {p: (Path(p) / "state.pt").stat().st_mtime_ns for p in first}

    # Resume with more epochs: continues at epoch 4 with the saved step and hierarchy.
    resumed = hirl_ray.fit(None, tiny_config(tmp_path, **{"train.epochs": 5}))
    after = find_checkpoints(run)
    assert [read_meta(p).epoch for p in after] == [1, 2, 3, 4, 5]
    assert {p: (Path(p) / "state.pt").stat().st_mtime_ns for p in after[:3]} == mtimes
    steps_per_epoch = metas[1].step - metas[0].step
    fourth = read_meta(after[3])
    assert fourth.step == metas[-1].step + steps_per_epoch  # not restarted from step 0
    assert fourth.hierarchy_version >= metas[-1].hierarchy_version
    assert fourth.metrics["hirl_active"]  # HIRL on from the first resumed step
    assert resumed.checkpoint_path.endswith("epoch_0005")

    backbone, preprocess = hirl_ray.load_backbone(resumed.checkpoint_path)
    from PIL import Image

    img = Image.new("RGB", (40, 40), (200, 30, 30))
    feats = backbone(preprocess(img).unsqueeze(0))
    assert feats.ndim == 2 and feats.shape[0] == 1 and torch.isfinite(feats).all()


@pytest.mark.usefixtures("ray_session")
def test_resume_with_incompatible_config_is_refused_without_touching_results(tmp_path):
    run = tmp_path / "run"
    hirl_ray.fit(None, tiny_config(tmp_path, **{"train.epochs": 2, "hirl.enabled": False,
                                                "train.num_workers": 1}))
    before = sorted(p.name for p in (run / "train").iterdir())
    with pytest.raises(hirl_ray.ConfigError, match="model.backbone='resnet18' differs"):
        hirl_ray.fit(None, tiny_config(tmp_path, **{"model.backbone": "resnet18"}))
    assert sorted(p.name for p in (run / "train").iterdir()) == before


@pytest.mark.usefixtures("ray_session")
def test_workers_follow_hirl_embedding(tmp_path):
    # hirl.embedding=backbone: the heads read and the actor clusters backbone features (width
    # model.width), not the projector's (method.proj_dim=32 in tiny_config).
    result = hirl_ray.fit(None, tiny_config(tmp_path, **{
        "hirl.embedding": "backbone", "train.epochs": 2, "train.num_workers": 1,
        "model.width": 24}))
    from hirl_ray.hierarchy.snapshot import load_hierarchy
    from hirl_ray.train.checkpoint import load_state

    h = load_hierarchy(result.hierarchy_path)
    state = load_state(result.checkpoint_path)["model"]
    head_in = [v.shape[1] for k, v in state.items() if k.startswith("heads.0.") and v.ndim == 2]
    assert head_in[0] == h.dim
    assert h.dim != 32


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_nan_stop_is_not_retried_even_with_max_failures(tmp_path):
    """train.on_nan=stop is a decision, not a crash: Ray Train must not restart the workers
    into the same NaN (max_failures retries every worker error)."""
    from hirl_ray.config import load_config
    from hirl_ray.runs import check_data, prepare_run
    from hirl_ray.train import ray_compat
    from hirl_ray.train.checkpoint import newest_checkpoint_config
    from hirl_ray.train.numerics import NonFiniteError
    from hirl_ray.train.ray_fit import train_on_ray

    class CountStarts(ray_compat.worker_group_callback_base()):
        """On the Train controller (pickled by value): a line per worker-group start."""

        def __init__(self, path: str) -> None:
            self.path = path

        def after_worker_group_start(self, worker_group) -> None:
            with open(self.path, "a") as f:
                f.write("start\n")

    counter = CountStarts(str(tmp_path / "starts.txt"))
    # lr 1e30: the first SGD step sends the weights to inf, the next loss is NaN.
    cfg = load_config(None, tiny_config(tmp_path, **{
        "train.lr": 1e30, "train.max_failures": 2, "train.on_nan": "stop",
        "train.num_workers": 1, "hirl.enabled": False}))
    run_dir = prepare_run(cfg, newest_checkpoint_config)
    with pytest.raises(NonFiniteError, match=r"train.on_nan=stop"):
        train_on_ray(cfg, run_dir, check_data(cfg), callbacks=[counter])
    assert (tmp_path / "starts.txt").read_text().splitlines() == ["start"]
    assert find_checkpoints(run_dir) == []
