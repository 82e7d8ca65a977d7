"""Checkpoints that are safe and bounded (issue 14): manifest hashes, damaged-newest fallback,
``weights_only`` loading, last-K + best retention with snapshot pruning, incompatible resume."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from hirl_ray import storage
from hirl_ray.config import ConfigError, load_config
from hirl_ray.eval.checkpoint import load_backbone, resolve_checkpoint
from hirl_ray.hierarchy import PrototypeHierarchy, save_hierarchy
from hirl_ray.hierarchy.snapshot import Origin, read_origins, snapshot_versions
from hirl_ray.methods.hirl import HirlModel
from hirl_ray.runs import LAYOUT, prepare_run
from hirl_ray.train import resume, retention
from hirl_ray.train.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    UnsafeCheckpointError,
    checkpoint_dir_name,
    find_checkpoints,
    is_best_copy,
    latest_good_checkpoint,
    load_state,
    newest_checkpoint_config,
    read_meta,
    resave_trusted,
    save_checkpoint,
)

SMALL = {"data.train_per_class": 4, "data.test_per_class": 3, "model.width": 8,
         "method.hidden_dim": 32, "method.proj_dim": 16, "hirl.num_clusters": [8, 4]}


def _meta(epoch: int, config: dict | None = None, **metrics) -> CheckpointMeta:
    return CheckpointMeta(epoch=epoch, step=10 * epoch, hierarchy_version=epoch,
                          config=config or {}, metrics=metrics)


def _save(run_dir: Path, epoch: int, name: str | None = None, config: dict | None = None,
          **metrics) -> str:
    path = Path(LAYOUT.train_dir(run_dir)) / (name or LAYOUT.checkpoint_name(epoch))
    return save_checkpoint(path, model_state={"w": torch.full((3,), float(epoch))},
                           optimizer_state={"state": {}, "param_groups": []}, scaler_state=None,
                           meta=_meta(epoch, config, **metrics))


def _flip_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- manifest and fallback --------------------------------------------------------------

def test_a_flipped_byte_or_a_torn_file_is_refused_and_the_previous_checkpoint_is_used(
        tmp_path, caplog):
    for e in (1, 2, 3):
        _save(tmp_path, e)
    newest = Path(find_checkpoints(tmp_path)[-1])
    assert (newest / "manifest.json").is_file()
    assert float(load_state(newest)["model"]["w"][0]) == 3.0  # verified, weights_only

    _flip_byte(newest / "state.pt")  # bit rot: same size, other content
    with pytest.raises(CheckpointError, match="state.pt does not match its manifest"):
        load_state(newest)
    with caplog.at_level(logging.WARNING, logger="hirl_ray"):
        good = latest_good_checkpoint(tmp_path)
    assert good is not None and good.endswith("epoch_0002")
    assert "epoch_0003" in caplog.text and "damaged" in caplog.text
    assert resolve_checkpoint(tmp_path).endswith("epoch_0002")  # eval/load_backbone of a run

    # A torn upload (cut short) of epoch 2 as well: epoch 1 is the newest good one.
    state2 = Path(find_checkpoints(tmp_path)[1]) / "state.pt"
    state2.write_bytes(state2.read_bytes()[:100])
    assert latest_good_checkpoint(tmp_path).endswith("epoch_0001")


def test_resume_falls_back_past_a_damaged_newest_also_when_ray_registered_it(tmp_path, caplog):
    for e in (1, 2, 3):
        _save(tmp_path, e)
    _flip_byte(Path(find_checkpoints(tmp_path)[-1]) / "state.pt")

    def registered():  # Ray's registered checkpoint is the damaged epoch 3
        d = find_checkpoints(tmp_path)[-1]
        return load_state(d), read_meta(d)

    with caplog.at_level(logging.WARNING, logger="hirl_ray"):
        state, plan = resume.agree_on_resume(0, torch.device("cpu"),
                                             lambda: find_checkpoints(tmp_path), registered,
                                             lambda attempt, round_id: None)
    assert plan.checkpoint.endswith("epoch_0002") and plan.epoch == 2
    assert float(state["model"]["w"][0]) == 2.0
    assert "falling back to the previous one" in caplog.text

    # Every checkpoint damaged: refuse rather than silently train from scratch.
    for path in find_checkpoints(tmp_path)[:2]:
        _flip_byte(Path(path) / "state.pt")
    with pytest.raises(RuntimeError, match="none of the 3 checkpoints loads"):
        resume.choose_checkpoint(find_checkpoints(tmp_path), None,
                                 lambda p: resume.load_with_retries(p, tries=1))


def test_a_redone_epoch_gets_its_own_folder_so_ray_never_deletes_it_with_the_damaged_one(
        tmp_path):
    assert checkpoint_dir_name(tmp_path, 3) == "epoch_0003"
    _save(tmp_path, 3)
    assert checkpoint_dir_name(tmp_path, 3) == "epoch_0003-redo1"
    _save(tmp_path, 3, name="epoch_0003-redo1")
    assert checkpoint_dir_name(tmp_path, 3) == "epoch_0003-redo2"


def test_load_backbone_of_a_run_folder_skips_a_damaged_newest(tmp_path, caplog):
    torch.manual_seed(0)
    cfg = load_config(None, SMALL)
    models = []
    for epoch in (1, 2):
        model = HirlModel.from_config(cfg)
        models.append(model)
        save_checkpoint(Path(LAYOUT.train_dir(tmp_path)) / LAYOUT.checkpoint_name(epoch),
                        model_state=model.state_dict(), optimizer_state={}, scaler_state=None,
                        meta=_meta(epoch, cfg.to_dict()))
    _flip_byte(Path(find_checkpoints(tmp_path)[-1]) / "meta.json", offset=-5)
    with caplog.at_level(logging.WARNING, logger="hirl_ray"):
        backbone, _ = load_backbone(tmp_path)
    expected = models[0].method.backbone.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in backbone.state_dict().items())
    assert "epoch_0002" in caplog.text


# ---- weights_only -------------------------------------------------------------------------

def test_numpy_values_are_stored_as_plain_values_and_load_with_weights_only(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, model_state={"w": torch.ones(2)},
                    optimizer_state={"param_groups": [{"lr": np.float64(0.1), "n": np.int64(3)}],
                                     "state": {0: {"buf": np.arange(3.0)}}},
                    scaler_state=None, meta=_meta(1))
    state = load_state(path)
    group = state["optimizer"]["param_groups"][0]
    assert type(group["lr"]) is float and type(group["n"]) is int
    assert torch.equal(state["optimizer"]["state"][0]["buf"],
                       torch.arange(3.0, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"state\['optimizer'\]\['x'\] is a set"):
        save_checkpoint(tmp_path / "bad", model_state={}, optimizer_state={"x": {1}},
                        scaler_state=None, meta=_meta(1))


def test_an_old_pickled_checkpoint_is_refused_with_one_line_and_can_be_converted(tmp_path):
    path = tmp_path / "old"
    path.mkdir()
    (path / "meta.json").write_text('{"epoch": 1, "step": 1, "hierarchy_version": 0, '
                                    '"config": {}, "metrics": {}}')
    buffer = io.BytesIO()  # what hirl_ray wrote before: torch.save of anything, no manifest
    torch.save({"model": {"w": torch.ones(2)}, "optimizer": {"lr": np.float64(0.1)},
                "scaler": None}, buffer)
    (path / "state.pt").write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeCheckpointError) as err:
        load_state(path)
    message = str(err.value)
    assert "\n" not in message and "weights_only" in message and "resave_trusted" in message
    # Resume never skips it silently (it would fall back to training from scratch).
    with pytest.raises(UnsafeCheckpointError):
        resume.choose_checkpoint([str(path)], None, lambda p: resume.load_with_retries(p, 3))
    resave_trusted(path)
    assert load_state(path)["optimizer"]["lr"] == 0.1
    assert (path / "manifest.json").is_file()


# ---- retention ----------------------------------------------------------------------------

def _ray_keeps_newest(run_dir: Path, keep: int) -> None:
    """What Ray Train's CheckpointConfig(num_to_keep) does after a report: newest ``keep``."""
    epochs = [p for p in find_checkpoints(run_dir) if not is_best_copy(p)]
    for path in epochs[:-keep]:
        storage.delete_dir(path)


def _snapshot(run_dir: Path, version: int) -> None:
    h = PrototypeHierarchy(version=version, centroids=(torch.eye(2),), parents=(),
                           assignments=(torch.zeros(4, dtype=torch.long),),
                           densities=(torch.ones(2),))
    save_hierarchy(h, LAYOUT.hierarchy_dir(run_dir), Origin(version, 1, version))


def test_the_newest_k_the_best_and_the_snapshots_they_use_are_kept(tmp_path):
    cfg = load_config(None, {"storage.keep_checkpoints": 2, "storage.keep_snapshots": 2,
                             "storage.best_metric": "knn_acc/class", "eval.every_epochs": 1,
                             "storage.path": str(tmp_path)}).storage
    accuracy = {1: 0.2, 2: 0.7, 3: 0.4, 4: 0.5, 5: 0.6, 6: 0.8, 7: 0.1, 8: 0.3, 9: 0.2}
    for epoch, acc in accuracy.items():
        _snapshot(tmp_path, epoch)  # one rebuild per epoch: the checkpoint uses version=epoch
        meta = _meta(epoch, **{"knn_acc/class": acc, "loss": 1.0 / epoch})
        retention.before_report(tmp_path, meta, cfg)  # rank 0, before ray.train.report
        _save(tmp_path, epoch, **meta.metrics)
        _ray_keeps_newest(tmp_path, cfg.keep_checkpoints)
        kept = find_checkpoints(tmp_path)
        best_epoch = max((e for e in accuracy if e <= epoch), key=accuracy.get)
        # The best so far is always on disk, and at most keep_checkpoints + 1 folders are.
        assert best_epoch in {read_meta(p).epoch for p in kept}
        assert len(kept) <= cfg.keep_checkpoints + 1
    names = [Path(p).name for p in find_checkpoints(tmp_path)]
    assert names == ["best_epoch_0006", "epoch_0008", "epoch_0009"]
    best = find_checkpoints(tmp_path)[0]
    assert read_meta(best).metrics["knn_acc/class"] == 0.8 and load_state(best)  # verified copy
    # Snapshots: the newest 2 plus every version a checkpoint listed at the last report
    # resumes with (epoch 7's, deleted by Ray after that report, goes at the next one).
    assert snapshot_versions(LAYOUT.hierarchy_dir(tmp_path)) == [6, 7, 8, 9]
    assert sorted(read_origins(LAYOUT.hierarchy_dir(tmp_path))) == [6, 7, 8, 9]


def test_retention_off_by_default_keeps_everything(tmp_path):
    cfg = load_config(None).storage
    assert (cfg.keep_checkpoints, cfg.keep_snapshots, cfg.best_metric) == (None, None, None)
    for epoch in (1, 2, 3):
        _snapshot(tmp_path, epoch)
        retention.before_report(tmp_path, _meta(epoch, loss=1.0), cfg)
        _save(tmp_path, epoch, loss=1.0)
    assert len(find_checkpoints(tmp_path)) == 3
    assert snapshot_versions(LAYOUT.hierarchy_dir(tmp_path)) == [1, 2, 3]


@pytest.mark.parametrize(("override", "message"), [
    ({"storage.keep_checkpoints": 0}, "storage.keep_checkpoints must be >= 1 or null"),
    ({"storage.keep_snapshots": -1}, "storage.keep_snapshots must be >= 1 or null"),
    ({"storage.best_mode": "highest"}, "storage.best_mode must be one of max, min"),
    ({"storage.best_metric": "knn_acc/class"}, "set eval.every_epochs > 0"),
])
def test_retention_settings_are_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


# ---- resuming with an incompatible config ---------------------------------------------

def test_resume_with_another_depth_is_refused_from_the_checkpoint_before_ray(tmp_path):
    cfg = load_config(None, {**SMALL, "storage.path": str(tmp_path)})
    run_dir = prepare_run(cfg, newest_checkpoint_config)
    _save(Path(run_dir), 1, config=cfg.to_dict())
    Path(LAYOUT.config_file(run_dir)).unlink()  # only the checkpoint says what was trained
    deeper = load_config(None, {**SMALL, "storage.path": str(tmp_path),
                                "hirl.num_clusters": [8, 4, 2]})
    with pytest.raises(ConfigError) as err:
        prepare_run(deeper, newest_checkpoint_config)
    message = str(err.value)
    assert message.startswith("hirl.num_clusters=[8, 4, 2] differs from [8, 4]")
    assert "hierarchy depth 3 vs 2" in message and "epoch_0001" in message
    other_backbone = load_config(None, {**SMALL, "storage.path": str(tmp_path),
                                        "model.width": 16})
    with pytest.raises(ConfigError, match="model.width=16 differs from 8"):
        prepare_run(other_backbone, newest_checkpoint_config)
    assert prepare_run(cfg, newest_checkpoint_config) == run_dir  # the same config resumes
