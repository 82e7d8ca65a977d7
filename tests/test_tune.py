"""Hierarchy search: strict space, valid samples, and a real interrupted-then-resumed sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml

import hirl_ray
from hirl_ray.config import ConfigError, load_config
from hirl_ray.eval.label_free import hierarchy_silhouette
from hirl_ray.sweep.sampling import (
    DefineByRun,
    cluster_sizes,
    grid_points,
    search_params,
    sizes_from_params,
)
from hirl_ray.sweep.space import IntRange, Range, TuneConfig, parse_tune_spec
from hirl_ray.train.checkpoint import find_checkpoints

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4


def tiny_sweep(tmp_path: Path, **tune_overrides) -> dict:
    """A sweep of tiny HIRL runs (well under a minute each on 2 CPUs)."""
    tune = {
        "metric": "knn_acc/superclass", "num_trials": 5, "max_concurrent_trials": 2,
        "space": {"depth": {"min": 1, "max": 2}, "level0_clusters": {"min": 6, "max": 24},
                  "shrink": {"min": 0.2, "max": 0.5},
                  "params": {"train.lr": {"min": 0.02, "max": 0.3, "log": True}}},
        "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 3},
        "searcher": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
        "eval_max_train_samples": 120,
    }
    tune.update(tune_overrides)
    return {
        "data": {"train_per_class": 10, "test_per_class": 5},
        "model": {"width": 16}, "method": {"hidden_dim": 64, "proj_dim": 32},
        "hirl": {"warmup_epochs": 1, "rebuild_every_epochs": 1, "num_neg_paths": 16,
                 "kmeans_nredo": 1, "kmeans_iters": 10},
        "train": {"epochs": EPOCHS, "batch_size": 32, "num_workers": 1},
        "storage": {"path": str(tmp_path), "name": "sweep"},
        "tune": tune,
    }


def _spec_and_params(raw: dict):
    cfg = load_config(raw)
    spec = cfg.section("tune")
    return spec, search_params(spec, cfg)


def test_every_sampled_hierarchy_is_valid_and_depth_conditions_the_space():
    spec, params = _spec_and_params(tiny_sweep(Path("/tmp"), space={
        "depth": {"min": 1, "max": 4}, "level0_clusters": {"min": 5, "max": 200},
        "shrink": {"min": 0.05, "max": 0.95}}))
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    space = DefineByRun(spec, params)
    depths = set()
    for _ in range(300):
        trial = study.ask()
        extra = space(trial)
        depth = trial.params["depth"]
        depths.add(depth)
        # Conditional: exactly the shrink ratios this depth uses were sampled.
        assert {k for k in trial.params if k.startswith("shrink_")} == \
            {f"shrink_{lv}" for lv in range(1, depth)}
        sizes = extra["num_clusters"]
        assert sizes == list(sizes_from_params(trial.params)) and len(sizes) == depth
        assert sizes[0] == trial.params["level0_clusters"] <= 200
        assert all(b < a for a, b in zip(sizes, sizes[1:], strict=False)) and sizes[-1] >= 2
        load_config(None, {"hirl.num_clusters": sizes, "data.train_per_class": 10})
        study.tell(trial, 0.0)
    assert depths == {1, 2, 3, 4}
    assert cluster_sizes(3, 40, [0.25, 0.5]) == (40, 10, 5)
    assert cluster_sizes(3, 4, [0.01, 0.01]) == (4, 3, 2)  # clamped, still decreasing


def test_grid_covers_the_same_space_with_valid_points():
    spec, params = _spec_and_params(tiny_sweep(Path("/tmp"), searcher={"name": "grid",
                                                                       "grid_points": 3}))
    points = grid_points(spec, params)
    # depth 1: 3 K_0 x 3 lr (no shrink); depth 2: 3 K_0 x 3 shrink x 3 lr
    assert len(points) == 9 + 27
    assert {tuple(p["num_clusters"]) for p in points} >= {(6,), (24,), (24, 12)}


@pytest.mark.parametrize("change, key", [
    ({"space": {"depth": {"min": 0, "max": 2}}}, "tune.space.depth.min"),
    ({"space": {"depth": {"min": 1, "max": 6}}}, "tune.space.level0_clusters.min"),
    ({"space": {"shrink": {"min": 0.5, "max": 1.5}}}, "tune.space.shrink"),
    ({"space": {"levels": 3}}, "tune.space.levels"),
    ({"space": {"params": {"storage.name": {"choices": ["a"]}}}}, "tune.space.params.storage"),
    ({"space": {"params": {"train.lr": {"min": "x", "max": 1}}}}, "tune.space.params.train.lr.min"),
    ({"metric": "accuracy"}, "tune.metric"),
    ({"metric": "knn_acc/species"}, "tune.metric"),
    ({"scheduler": {"grace_period": 1}}, "tune.scheduler.grace_period"),
    ({"space": {"level0_clusters": {"min": 6, "max": 500}}}, "tune.space.level0_clusters.max"),
    ({"space": {"params": {"hirl.warmup_epochs": {"choices": [1, 9]}}}},
     "tune.space.params.hirl.warmup_epochs"),
    ({"storage": {"url": "optuna.db"}}, "tune.storage.url"),
    ({"space": {"depth": {"min": 1.5, "max": 2}}}, "tune.space.depth.min"),
    ({"space": {"params": {"hirl.num_neg_paths": {"min": 1.5, "max": 4}}}},
     "tune.space.params.hirl.num_neg_paths.min"),
    ({"space": {"params": {"method.queue_size": {"min": 8, "max": 64}}}},  # not SimCLR's
     "tune.space.params.method.queue_size"),
    ({"space": {"params": {"train.optimizer": {"min": 1, "max": 2}}}},
     "tune.space.params.train.optimizer"),
    ({"space": {"params": {"train.lr": {"min": 0.1}}}}, "tune.space.params.train.lr"),
    ({"space": {"params": {"train.lr": {"choices": []}}}}, "tune.space.params.train.lr.choices"),
    ({"metric": ["nmi/class", "nmi/class"]}, "tune.metric"),
    ({"mode": ["max", "min"]}, "tune.mode"),
    ({"scheduler": {"name": "hyperband"}}, "tune.scheduler.name"),
    ({"searcher": {"grid_points": 1}}, "tune.searcher"),
    ({"resources": {"gpus_per_worker": 2}}, "tune.resources"),
    ({"num_trials": 0}, "tune.num_trials"),
])
def test_invalid_space_fails_naming_the_key_before_ray_starts(tmp_path, monkeypatch, change, key):
    import hirl_ray.sweep.search as search

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for an invalid space")

    monkeypatch.setattr(search, "run_sweep", no_ray)
    raw = tiny_sweep(tmp_path)
    for section, value in change.items():
        if isinstance(value, dict) and isinstance(raw["tune"].get(section), dict):
            raw["tune"][section] = {**raw["tune"][section], **value}
        else:
            raw["tune"][section] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        hirl_ray.tune(raw)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "sweep").exists()


def test_tune_section_round_trips_and_each_default_lives_in_its_dataclass():
    cfg = load_config(ROOT / "experiments" / "tune_default.yaml")
    spec = cfg.section("tune")
    assert isinstance(spec, TuneConfig)
    assert spec.metrics == ("knn_acc/subclass", "label_free/silhouette")
    assert spec.modes == ("max", "max") and spec.multi_objective
    # A sweep saves cfg.to_dict() as JSON (sweep.json) and reloads it: equal, tune: included.
    again = load_config(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.section("tune") == spec
    # A partial range keeps the other bound's default; one metric is a string; a wall-time
    # metric is minimised by default.
    partial = parse_tune_spec({"metric": "time_total_s", "space": {"depth": {"max": 2}}})
    assert partial.space.depth.min == TuneConfig().space.depth.min == 2
    assert partial.space.level0_clusters.log and partial.metrics == ("time_total_s",)
    assert partial.modes == ("min",) and partial.scheduler.grace_period == 3


def test_searched_keys_take_the_type_of_the_config_key_they_set(tmp_path):
    raw = tiny_sweep(tmp_path, space={"params": {
        "train.lr": {"min": 1, "max": 2},  # integers given for a float key: still a float range
        "hirl.num_neg_paths": {"min": 16, "max": 64, "log": True},
        "method.temperature": {"choices": [0.1, 0.5]}}})
    cfg = load_config(raw)
    params = dict(search_params(cfg.section("tune"), cfg))
    assert type(params["train.lr"]) is Range and not params["train.lr"].is_int
    assert params["hirl.num_neg_paths"] == IntRange(16, 64, log=True)
    assert params["method.temperature"].values == (0.1, 0.5)
    # method.* keys belong to the chosen method's own config.
    raw["method"]["name"] = "mocov2"
    raw["tune"]["space"]["params"] = {"method.queue_size": {"min": 64, "max": 256}}
    cfg = load_config(raw)
    assert dict(search_params(cfg.section("tune"), cfg)) == {
        "method.queue_size": IntRange(64, 256)}


def test_sweep_refuses_remote_storage_and_a_missing_tune_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_sweep(tmp_path)
    raw["storage"] = {"path": "gs://bucket/sweeps", "name": "s"}
    with pytest.raises(ConfigError, match=r"storage\.path=gs://bucket/sweeps: sweeps write to "
                                          "a local folder"):
        hirl_ray.tune(raw)
    assert not any(tmp_path.iterdir())  # no local folder "gs:/bucket/..." appeared
    del raw["tune"]
    raw["storage"] = {"path": str(tmp_path), "name": "s"}
    with pytest.raises(ConfigError, match="no tune: section"):
        hirl_ray.tune(raw)


def test_label_free_silhouette_prefers_the_true_number_of_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16)) * 4
    x = np.concatenate([c + 0.3 * rng.normal(size=(30, 16)) for c in centres])
    right = hierarchy_silhouette(x, [6])
    assert right > hierarchy_silhouette(x, [17]) and right > 0.5
    assert -1 <= hierarchy_silhouette(rng.normal(size=(180, 16)), [6, 3]) < right


@pytest.fixture()
def local_ray():
    """The session's Ray if one runs, else a fresh local one (2 CPUs, no dashboard).

    Started by address (``connect``): a stale ``/tmp/ray/ray_current_cluster`` left by a
    ``ray start`` on this machine must not make ``ray.init`` try to join that cluster.
    """
    import ray

    from hirl_ray.train.ray_cluster import connect

    started = not ray.is_initialized()
    if started:
        connect(num_cpus=2, dashboard=False)
    yield ray
    if started:
        ray.shutdown()


def _checkpoint_mtimes(sweep: Path) -> dict[str, int]:
    return {str(p): (Path(p) / "state.pt").stat().st_mtime_ns
            for run in (sweep / "trials").glob("*") for p in find_checkpoints(run)}


def _interrupt_when_one_trial_done_and_another_midway(proc, sweep: Path, limit_s=240) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and proc.poll() is None:
        runs = [find_checkpoints(r) for r in (sweep / "trials").glob("*")]
        done = sum(len(c) == EPOCHS for c in runs)
        midway = sum(2 <= len(c) < EPOCHS for c in runs)
        if done >= 1 and midway >= 1:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
            return
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"sweep never reached the interruption point: {proc.communicate()[0][-3000:]}")


@pytest.mark.slow
def test_sweep_interrupted_then_resumed_keeps_finished_trials_and_best_checkpoint_loads(
        tmp_path, local_ray):
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(tiny_sweep(tmp_path)))
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HIRL_RAY_DASHBOARD": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "hirl_ray.cli", "tune", str(config)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _interrupt_when_one_trial_done_and_another_midway(proc, sweep)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "--resume" in out  # the CLI says how to continue
    before = _checkpoint_mtimes(sweep)
    finished = {Path(p).parent.parent.name for p in before
                if Path(p).name == f"epoch_{EPOCHS:04d}"}
    assert finished

    result = hirl_ray.tune(config, resume=True)
    table = result.results
    assert not result.interrupted
    assert len(table) == 5 and table["trial_id"].is_unique
    # Finished trials were not rerun (not one file touched); a trial that was midway continued
    # from its checkpoints instead of epoch 1: only its newest checkpoint may be redone (Ray
    # Train restores the newest checkpoint *it* registered, which can lag the one on disk).
    after = _checkpoint_mtimes(sweep)
    for trial in {Path(p).parent.parent.name for p in before}:
        mine = sorted(p for p in before if f"/{trial}/" in p)
        kept = mine if trial in finished else mine[:-1]
        assert {p: after[p] for p in kept} == {p: before[p] for p in kept}, trial
        if trial in finished:
            assert sorted(p for p in after if f"/{trial}/" in p) == mine
    assert set(table["epochs_trained"]) <= set(range(1, EPOCHS + 1))
    # ASHA stopped at least one trial, and trials started after it still ran to the end
    # (ray #54305: a stopped Train V2 run must free its CPUs).
    stopped = table[table["stopped_early"]]
    assert len(stopped) >= 1
    # Every trial ran (the sweep did not hang on a stopped trial's resources); those that
    # started after a stop trained past their first epoch. Which trials start after the
    # first stop depends on timing, so the second check may cover none on a busy machine.
    assert (table["epochs_reported"] >= 1).all()
    later = table[table["started"] > stopped["finished"].min()]  # trained after the stop
    assert (later["epochs_reported"] >= 2).all()
    state = local_ray.util.placement_group_table()
    recorded = [f.read_text().strip() for f in (sweep / "trials").glob("*/placement_group.txt")]
    ours = [pg for pg in recorded if pg in state]  # the others belonged to the first Ray
    assert ours and all(state[pg]["state"] == "REMOVED" for pg in ours)
    # The searcher survived the restore (ray #30861): one study, every trial told.
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert len(study.trials) == 5
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    # Best trial: its metric beats (or ties) every other trial, and the checkpoint loads.
    assert result.best_metrics["knn_acc/superclass"] == table["knn_acc/superclass"].max()
    assert result.best_config["num_clusters"] == \
        [int(k) for k in table.loc[table["knn_acc/superclass"].idxmax(), "num_clusters"]
         .split("/")]
    backbone, preprocess = hirl_ray.load_backbone(result.best_checkpoint)
    from PIL import Image

    feats = backbone(preprocess(Image.new("RGB", (32, 32), (0, 200, 0))).unsqueeze(0))
    assert feats.shape[0] == 1 and torch.isfinite(feats).all()
    # TensorBoard: every trial folder has event files (a resumed trial gets a second one).
    assert len({p.parent for p in (sweep / "tune").glob("*/events.out.tfevents*")}) == 5
    assert json.loads((sweep / "sweep.json").read_text())["num_samples"] == 240

    _check_report_and_dashboard(sweep, env)


def _check_report_and_dashboard(sweep: Path, env: dict) -> None:
    from hirl_ray.sweep.report import screenshot, write_report

    index = write_report(sweep)
    page = index.read_text()
    for name in ("history", "parallel_coordinates", "importance", "learning_curves",
                 "prototype_tree"):
        assert (index.parent / f"{name}.png").stat().st_size > 5000, name
    assert page.count("data:image/png;base64,") == 5 and "src=\"http" not in page
    # Every trial reported every label-free criterion; each is ranked against kNN.
    from hirl_ray.sweep.space import LABEL_FREE_METRICS

    assert all(f"{c} vs kNN" in page for c in LABEL_FREE_METRICS), page[:3000]
    if any(os.path.exists(p) for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")):
        shot = screenshot(index, sweep / "report.png", height=1600)
        from PIL import Image

        img = np.asarray(Image.open(shot).convert("L"))
        assert img.shape[0] >= 1000 and img.std() > 10  # rendered, not a blank page
    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen([sys.executable, "-m", "hirl_ray.cli", "dashboard", str(sweep),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as r:
                    studies = json.loads(r.read())["study_summaries"]
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("optuna-dashboard did not answer on 127.0.0.1")
        assert [s["study_name"] for s in studies] == ["sweep"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
