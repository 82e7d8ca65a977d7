"""Watching a run (issue 16) without Ray: progress lines, TensorBoard events, status.json and
``hirl-ray status`` (local and on the moto S3 server)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch

from hirl_ray import status as run_status
from hirl_ray.cli import main
from hirl_ray.config import ConfigError, load_config
from hirl_ray.hierarchy import fit_hierarchy
from hirl_ray.train.loop import EpochStats, StaticHierarchy, StepView, train_epoch
from hirl_ray.train.observe import RunObserver, cluster_stats, hierarchy_state
from hirl_ray.train.tensorboard import TensorBoardLog

from .test_numerics import CPU, _batch, _moco

torch.set_num_threads(1)


class FakeClock:
    """Monotonic seconds that only move when the (slowed) loader says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SlowLoader:
    """Batches that each take ``seconds`` of (fake) time to load."""

    def __init__(self, batches, clock: FakeClock, seconds: float) -> None:
        self.batches, self.clock, self.seconds = batches, clock, seconds

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.clock.now += self.seconds
            yield batch


def _cfg(tmp_path, **overrides):
    return load_config(None, {"storage.path": str(tmp_path), "storage.name": "run",
                              "train.epochs": 4, **overrides})


def test_non_terminal_progress_lines_come_at_least_every_interval_with_a_slow_loader(tmp_path):
    clock, lines = FakeClock(), []
    cfg = _cfg(tmp_path, **{"train.progress_every_s": 20.0, "observe.tensorboard": False,
                            "observe.status_every_s": 20.0})
    obs = RunObserver(cfg, cfg.run_dir, world=2, hierarchy=lambda: "warm-up", clock=clock,
                      emit=lambda text: lines.append((clock.now, text)))
    _, model, opt = _moco()
    loader = SlowLoader([_batch(i) for i in range(12)], clock, seconds=7.0)  # 84 s in all
    obs.begin_epoch(1, len(loader))
    start = clock.now
    train_epoch(model, loader, opt, epoch=1, step=12, total_steps=48, base_lr=0.1,
                warmup_steps=0, hierarchy=StaticHierarchy(None), device=CPU, observer=obs)
    times = [start] + [t for t, _ in lines]
    assert len(lines) >= 3
    # A line at most one (7 s) batch after the 20 s interval: never 30 s without one.
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) <= 27.0
    first = lines[0][1]
    assert re.search(r"epoch 2/4 step 3/12 \(25%\) \| loss \d+\.\d+ ssl \d+\.\d+ \| lr ", first)
    assert "samples/s | hierarchy warm-up | ETA epoch 1:03, run " in first
    # status.json was written with the same progress.
    status = run_status.read_status(cfg.run_dir)
    last_step = int(re.search(r"step (\d+)/", lines[-1][1]).group(1))
    assert status["state"] == "running" and status["epoch_step"] == last_step


def test_quiet_steps_never_read_the_losses(tmp_path):
    class Unreadable(torch.Tensor):
        def tolist(self):  # a host sync on a GPU: only for steps that show something
            raise AssertionError("read on a quiet step")

    clock = FakeClock()
    cfg = _cfg(tmp_path, **{"train.progress_every_s": 100.0, "observe.status_every_s": 100.0})
    obs = RunObserver(cfg, cfg.run_dir, world=1, hierarchy=lambda: "v1", clock=clock)
    obs.begin_epoch(0, 10)
    losses = torch.zeros(3).as_subclass(Unreadable)
    for i in range(1, 10):
        clock.now += 1.0
        obs.on_step(StepView(epoch=0, step=i, steps=i, steps_per_epoch=10, total_steps=40,
                             samples=8 * i, losses=losses, semantic=False, lr=0.1, data_s=0.1,
                             compute_s=0.2))
    clock.now += 100.0
    with pytest.raises(AssertionError, match="read on a quiet step"):
        obs.on_step(StepView(epoch=0, step=10, steps=10, steps_per_epoch=10, total_steps=40,
                             samples=80, losses=losses, semantic=False, lr=0.1, data_s=0.1,
                             compute_s=0.2))


def test_on_a_terminal_a_bar_counts_steps_and_shows_the_line(tmp_path):
    class Bar:  # the tqdm / tqdm_ray interface the observer uses
        made: list = []

        def __init__(self, total, unit, desc):
            self.total, self.desc, self.n, self.closed = total, desc, 0, False
            Bar.made.append(self)

        def update(self, n):
            self.n += n

        def set_description(self, text):
            self.desc = text

        def close(self):
            self.closed = True

    clock, lines = FakeClock(), []
    cfg = _cfg(tmp_path, **{"train.progress_every_s": 5.0, "observe.tensorboard": False})
    obs = RunObserver(cfg, cfg.run_dir, world=1, hierarchy=lambda: "v2", clock=clock, bar=Bar,
                      emit=lines.append)
    obs.begin_epoch(0, 8)
    for i in range(1, 9):
        clock.now += 1.0
        obs.on_step(StepView(epoch=0, step=i, steps=i, steps_per_epoch=8, total_steps=32,
                             samples=4 * i, losses=torch.tensor([1.0, 1.0, 0.0]),
                             semantic=False, lr=0.1, data_s=0.0, compute_s=1.0))
    bar = Bar.made[0]
    assert (bar.total, bar.n) == (8, 8) and "hierarchy v2" in bar.desc and not lines
    obs.end_epoch(EpochStats(epoch=0, loss=1.0, method_loss=1.0, semantic_loss=None,
                             semantic_steps=0, steps=8, samples=32, seconds=8.0, lr=0.1,
                             hierarchy_version=2), 8, {}, hierarchy=None, rebuild=None,
                  checkpoint="epoch_0001")
    assert bar.closed


def _step(i: int, loss: float) -> StepView:
    """Step ``i`` of a 4-step epoch (the trackers' tests)."""
    return StepView(epoch=0, step=i, steps=i, steps_per_epoch=4, total_steps=8, samples=8 * i,
                    losses=torch.tensor([loss, loss - 0.5, 0.5]), semantic=True, lr=0.05,
                    data_s=0.1, compute_s=0.4, grad_norm=torch.tensor(2.0))


def _stats(epoch: int) -> EpochStats:
    return EpochStats(epoch=epoch, loss=1.5, method_loss=1.0, semantic_loss=0.5,
                      semantic_steps=4, steps=4, samples=32, seconds=4.0, lr=0.05,
                      hierarchy_version=1)


def _warnings_while_down(board, owner, attr: str, values: dict, monkeypatch, caplog,
                         message: str) -> list[str]:
    """A tracker board whose client call ``owner.attr`` always fails, given ``values`` at steps
    1-3: the warnings logged that contain ``message``. Restores ``owner.attr`` after."""
    def down(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
        m.setattr(owner, attr, down)
        for step in range(1, 4):
            board.scalars(values, step)  # does not raise
    return [r.getMessage() for r in caplog.records if message in r.getMessage()]


def _hierarchy():
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)
    return fit_hierarchy(feats, [6, 2], niter=5, nredo=1, version=1), feats


def test_tensorboard_holds_step_and_epoch_scalars_and_the_tree_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, **{"observe.every_steps": 2})
    clock = FakeClock()
    tb = TensorBoardLog(cfg.run_dir)
    obs = RunObserver(cfg, cfg.run_dir, world=1, hierarchy=lambda: "v1", clock=clock,
                      boards=[tb])
    h, feats = _hierarchy()
    images = torch.randint(0, 255, (60, 3, 8, 8), dtype=torch.uint8)
    obs.begin_epoch(0, 4)
    for i in range(1, 5):
        clock.now += 1.0
        obs.on_step(StepView(epoch=0, step=i, steps=i, steps_per_epoch=4, total_steps=16,
                             samples=8 * i, losses=torch.tensor([2.0 - i / 10, 1.5, 0.5]),
                             semantic=True, lr=0.05, data_s=0.25, compute_s=0.75,
                             grad_norm=torch.tensor(3.0)))
    stats = EpochStats(epoch=0, loss=1.8, method_loss=1.5, semantic_loss=0.5, semantic_steps=4,
                       steps=4, samples=32, seconds=4.0, lr=0.05, hierarchy_version=1)
    rebuild = {"version": 1, "seconds": 2.5, "phases": {"gather": 0.5, "level0": 1.0,
                                                        "level1": 0.5, "publish": 0.5},
               "peak_rss_gb": 0.3, "superseded": 0}
    from hirl_ray.eval.plots import prototype_tree_figure

    obs.end_epoch(stats, 4, {"loss": 1.8, "knn_acc/class": 0.4, "hirl_active": True,
                             "hierarchy_attempt": 7},
                  hierarchy=h, rebuild=rebuild, checkpoint="epoch_0001",
                  tree=lambda hh: prototype_tree_figure(hh, feats, np.arange(60),
                                                        lambda i: images[i], "tree"))
    obs.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("loss/total")] == [2, 4]
    assert acc.Scalars("loss/total")[-1].value == pytest.approx(1.6)
    assert acc.Scalars("time/data_wait_s")[-1].value == pytest.approx(0.25)
    assert acc.Scalars("grad_norm")[-1].value == pytest.approx(3.0)
    assert acc.Scalars("epoch/knn_acc/class")[0].step == 1
    assert acc.Scalars("rebuild/level0_s")[0].value == pytest.approx(1.0)
    assert "epoch/hirl_active" not in tags["scalars"]  # booleans are not curves
    assert "epoch/hierarchy_attempt" not in tags["scalars"]  # nor resume bookkeeping
    counts = np.bincount(h.assignments[0].numpy(), minlength=6)
    assert acc.Scalars("hierarchy/level0/largest")[0].value == counts.max()
    assert acc.Scalars("hierarchy/level0/empty")[0].value == (counts == 0).sum()
    assert tags["images"] == ["hierarchy/prototype_tree"]
    image = acc.Images("hierarchy/prototype_tree")[0]
    assert image.step == 1 and image.width > 100 and image.encoded_image_string[:4] == b"\x89PNG"


def test_cluster_stats_count_empty_clusters():
    h, _ = _hierarchy()
    a = h.assignments[0].clone()
    a[a == 3] = 2  # cluster 3 empties
    h = type(h)(version=2, centroids=h.centroids, parents=h.parents,
                assignments=(a, h.assignments[1]), densities=h.densities)
    stats = cluster_stats(h)
    assert stats["hierarchy/level0/empty"] == 1 and stats["hierarchy/version"] == 2
    assert stats["hierarchy/level0/clusters"] == 6


def test_hierarchy_state_text():
    class Client:
        current, building = None, True

    assert hierarchy_state(Client()) == "warm-up, building v1"
    assert hierarchy_state(StaticHierarchy(None), enabled=False) == "off"
    h, _ = _hierarchy()
    assert hierarchy_state(StaticHierarchy(h)) == "v1"


def test_progress_interval_must_be_positive():
    with pytest.raises(ConfigError, match=r"train.progress_every_s must be > 0"):
        load_config(None, {"train.progress_every_s": 0})
    with pytest.raises(ConfigError, match=r"observe.every_steps must be > 0"):
        load_config(None, {"observe.every_steps": 0})


def _running_status(run_dir: str) -> None:
    run_status.write_status(run_dir, {
        "state": "running", "epoch": 2, "epochs": 10, "step": 250, "total_steps": 1000,
        "epoch_step": 50, "steps_per_epoch": 100, "loss": 4.25, "ssl_loss": 4.0,
        "semantic_loss": 0.25, "samples_per_s": 1234.0, "eta_epoch_s": 65.0,
        "eta_run_s": 3725.0, "hierarchy": {"state": "v2, building v3"},
        "last_checkpoint": "epoch_0002", "tensorboard": f"{run_dir}/tensorboard",
        "last_rebuild": {"version": 2, "seconds": 12.5, "phases": {"gather": 2.0},
                         "peak_rss_gb": 1.5, "superseded": 1}})


def _check_status_command(run_dir: str, capsys) -> None:
    assert main(["status", run_dir]) == 0
    out = capsys.readouterr().out
    assert "State        running (updated 0:0" in out
    assert "Epoch        2/10 done; step 250/1000 (50/100 in this epoch)" in out
    assert "1,234 samples/s; ETA epoch 1:05, run 1:02:05" in out
    assert "Hierarchy    v2, building v3" in out and "Checkpoint   epoch_0002" in out
    assert "Last rebuild v2: 12.5s (gather 2.0s); peak memory 1.50 GB; 1 round(s) superseded" \
        in out
    run_status.mark(run_dir, "finished")
    assert main(["status", run_dir]) == 0
    assert "State        finished" in capsys.readouterr().out


def test_status_command_on_a_local_run(tmp_path, capsys):
    run = str(tmp_path / "run")
    _running_status(run)
    _check_status_command(run, capsys)
    assert main(["status", str(tmp_path / "none")]) == 2  # no such run: one line
    assert "no run folder at" in capsys.readouterr().err


def test_status_command_on_s3(s3_server, capsys):
    import boto3

    s3 = boto3.client("s3")
    if "hirl-status" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket="hirl-status")
    run = "s3://hirl-status/runs/r1"
    _running_status(run)
    _check_status_command(run, capsys)


def test_tensorboard_events_reach_an_s3_run_folder(s3_server):
    import boto3

    s3 = boto3.client("s3")
    if "hirl-status" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket="hirl-status")
    tb = TensorBoardLog("s3://hirl-status/runs/tb")
    tb.scalars({"loss/total": 1.0}, 1)
    tb.sync()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="hirl-status",
                                                 Prefix="runs/tb/tensorboard/")["Contents"]]
    assert len(keys) == 1 and "tfevents" in keys[0]
    first = s3.get_object(Bucket="hirl-status", Key=keys[0])["ContentLength"]
    tb.scalars({"loss/total": 0.5}, 2)
    tb.close()
    assert s3.get_object(Bucket="hirl-status", Key=keys[0])["ContentLength"] > first
