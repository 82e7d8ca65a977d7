"""``observe.wandb``: a fit's curves, tree picture and config in a W&B run (issue 16).

W&B in offline mode (no network): its run files under the test's folder, read back with the
small reader below (wandb has no Python reader of ``.wandb`` files); the Ray fit that writes
one is in ``test_observe_ray.py``.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from hirl_ray.config import ConfigError, load_config
from hirl_ray.eval.plots import prototype_tree_figure
from hirl_ray.logs import REDACTED
from hirl_ray.runs import LAYOUT
from hirl_ray.status import format_status
from hirl_ray.train.observe import RunObserver
from hirl_ray.train.wandb_log import WandbLog, check_wandb

from .test_observe import FakeClock, _hierarchy, _stats, _step, _warnings_while_down

wandb = pytest.importorskip("wandb")
torch.set_num_threads(1)

BLOCK, HEADER = 32 * 1024, 7  # LevelDB-log-style blocks; record header crc32 | len | type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """The ``Record`` protos of a ``.wandb`` file: a 7-byte file header (``:W&B``, magic
    0xBEE1, version), then 32 KiB blocks of chunks ``crc32 | length (LE) | type | data``
    (crc32 of type + data); a block tail shorter than a chunk header is padding."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # padding at the end of a block
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if crc == 0 and length == 0 and kind == 0:  # zero fill of a block not yet written
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: corrupt record at {pos}"
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


class WandbRun:
    """What an offline run's ``.wandb`` file(s) hold: id, config, history rows, exit code."""

    def __init__(self, files: list[Path]) -> None:
        self.ids, self.rows, self.config, self.exit_codes, self.name = set(), [], {}, [], ""
        for f in files:
            for r in read_records(f):
                kind = r.WhichOneof("record_type")
                if kind == "run":
                    self.ids.add(r.run.run_id)
                    self.name = r.run.display_name
                    self._config(r.run.config)
                elif kind == "config":
                    self._config(r.config)
                elif kind == "history":  # a logged dict (an image) is one item per leaf
                    row: dict[str, Any] = {}
                    for i in r.history.item:
                        *outer, leaf = [i.key] if i.key else list(i.nested_key)
                        target = row
                        for name in outer:
                            target = target.setdefault(name, {})
                        target[leaf] = json.loads(i.value_json)
                    self.rows.append(row)
                elif kind == "exit":
                    self.exit_codes.append(r.exit.exit_code)

    def _config(self, config: Any) -> None:
        for item in config.update:
            self.config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)

    def curve(self, key: str, axis: str) -> list[tuple[Any, Any]]:
        return [(row[axis], row[key]) for row in self.rows if key in row]


def _run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.fixture(autouse=True)
def wandb_offline(tmp_path, monkeypatch):
    """Offline W&B with its folders in ``tmp_path``, silent; no key, no settings of the user."""
    import os

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))


def _cfg(tmp_path, name="run", **overrides):
    return load_config(None, {"storage.path": str(tmp_path), "storage.name": name,
                              "train.epochs": 4, "observe.every_steps": 2, "observe.wandb": True,
                              "observe.tensorboard": False, **overrides})



def test_the_observer_writes_step_and_epoch_scalars_the_tree_and_the_redacted_config(
        tmp_path, monkeypatch):
    secret = "s3cr3t-value-Zq81"
    monkeypatch.setenv("HIRL_TEST_TOKEN", secret)  # any *_TOKEN value is a secret
    cfg = _cfg(tmp_path, name=f"run-{secret}")
    check_wandb(cfg)  # offline: no key needed
    clock = FakeClock()
    board = WandbLog(cfg, cfg.run_dir)
    obs = RunObserver(cfg, cfg.run_dir, world=2, hierarchy=lambda: "v1", clock=clock,
                      boards=[board])
    h, feats = _hierarchy()
    images = torch.randint(0, 255, (60, 3, 8, 8), dtype=torch.uint8)

    def tree(hh):
        return prototype_tree_figure(hh, feats, range(60), lambda i: images[i], "tree")

    for epoch in range(2):
        obs.begin_epoch(epoch, 4)
        for i in range(1, 5):
            clock.now += 1.0
            obs.on_step(_step(4 * epoch + i, 2.0 - (4 * epoch + i) / 10))
        obs.end_epoch(_stats(epoch), 4 * (epoch + 1),
                      {"loss": 1.5 - epoch, "knn_acc/class": 0.4, "hirl_active": True},
                      hierarchy=h, rebuild=None, checkpoint=f"epoch_{epoch + 1:04d}",
                      tree=tree)
    obs.close("finished")

    run_dir = tmp_path / f"run-{secret}"
    saved = json.loads((run_dir / LAYOUT.wandb).read_text())
    (file,) = _run_files(run_dir)  # W&B's files in the run folder, not in WANDB_DIR
    run = WandbRun([file])
    assert run.ids == {saved["run_id"]} and run.exit_codes == [0]
    # Step scalars every observe.every_steps steps against global_step; epoch ones
    # against epoch; W&B's own _step counts log calls and is no one's x-axis.
    assert run.curve("loss/total", "global_step") == \
        [(2, pytest.approx(1.8)), (4, pytest.approx(1.6)), (6, pytest.approx(1.4)),
         (8, pytest.approx(1.2))]
    assert run.curve("grad_norm", "global_step") == [(2, 2.0), (4, 2.0), (6, 2.0), (8, 2.0)]
    assert run.curve("epoch/loss", "epoch") == [(1, 1.5), (2, 0.5)]
    assert run.curve("epoch/knn_acc/class", "epoch") == [(1, 0.4), (2, 0.4)]
    assert run.curve("hierarchy/level0/clusters", "epoch") == [(1, 6), (2, 6)]
    assert not any("epoch/hirl_active" in row for row in run.rows)  # booleans are not curves
    assert not any("epoch" in row and "loss/total" in row for row in run.rows)
    # The tree, drawn once for hierarchy v1, as an image at the epoch it appeared.
    (tree,) = [row for row in run.rows if "hierarchy/prototype_tree" in row]
    assert tree["hierarchy/prototype_tree"]["_type"] == "image-file" and tree["epoch"] == 1
    image = file.parent / "files" / tree["hierarchy/prototype_tree"]["path"]
    assert image.read_bytes()[:4] == b"\x89PNG"
    # The config, secrets redacted; the run's name too.
    config = run.config
    assert config["hirl"]["num_clusters"] == list(cfg.hirl.num_clusters)
    assert config["observe"]["wandb"] is True and config["method"]["name"] == cfg.method.name
    assert config["storage"]["name"] == f"run-{REDACTED}" and run.name == f"run-{REDACTED}"
    assert secret not in json.dumps([run.config, run.name, run.rows])  # (the folder has it)
    # status.json and `hirl-ray status` say where the run is.
    status = json.loads((run_dir / "status.json").read_text())
    assert status["wandb"].startswith(f"offline {file.parent}")
    assert f"W&B          offline {file.parent}" in format_status(str(run_dir), status)


def test_a_resumed_fit_continues_its_wandb_run(tmp_path):
    cfg = _cfg(tmp_path)
    first = WandbLog(cfg, cfg.run_dir)
    first.scalars({"loss/total": 3.0}, 1)
    first.close("stopped")
    again = WandbLog(cfg, cfg.run_dir)  # the rerun (or Ray's restart of rank 0)
    assert again.run_id == first.run_id
    again.scalars({"loss/total": 2.0, "lr": float("nan"), "ok": True}, 2)
    again.close("finished")
    run = WandbRun(_run_files(tmp_path / "run"))
    assert run.ids == {first.run_id} and sorted(run.exit_codes) == [0, 1]
    assert run.curve("loss/total", "global_step") == [(1, 3.0), (2, 2.0)]
    assert not any("lr" in row or "ok" in row for row in run.rows)  # NaN and booleans left out


def test_a_failing_log_costs_one_warning_not_the_run(tmp_path, monkeypatch, caplog):
    cfg = _cfg(tmp_path)
    board = WandbLog(cfg, cfg.run_dir)
    warned = _warnings_while_down(board, board.run, "log", {"loss/total": 1.0, "epoch/loss": 1.0},
                                  monkeypatch, caplog, "W&B: could not log metrics")
    board.close("finished")
    assert len(warned) == 1 and "training goes on" in warned[0]


def test_checks_before_ray_name_the_key(tmp_path, monkeypatch):
    check_wandb(load_config(None, {}))  # off: nothing asked of W&B
    on = load_config(None, {"observe.wandb": True})
    check_wandb(on)  # offline (the fixture): no key needed
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError, match=r"^observe.wandb is on but no W&B API key is "
                                          r"configured for .*: set WANDB_API_KEY .* or "
                                          r"WANDB_MODE=offline .*observe.wandb=false$"):
        check_wandb(on)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    check_wandb(on)  # the environment's key (not checked against the server)
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine {wandb.Settings().base_url.split('://')[1]}\n  login user\n"
                     f"  password {'n' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    check_wandb(on)  # `wandb login`'s netrc entry
    with pytest.raises(ConfigError, match=r"^observe.wandb_project must not be empty"):
        load_config(None, {"observe.wandb": True, "observe.wandb_project": ""})
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match=r"wandb package is not installed: pip install "
                                          r"'hirl_ray\[wandb\]'"):
        check_wandb(on)


def test_rank_0_runs_in_the_drivers_wandb_mode(tmp_path, monkeypatch):
    from hirl_ray.train.ray_worker import worker_config

    cfg = _cfg(tmp_path)
    carried = worker_config(cfg, "actor", cfg.run_dir)["wandb_mode"]
    assert carried == "offline"  # the driver's WANDB_MODE (the fixture's)
    assert worker_config(load_config(cfg, {"observe.wandb": False}), "a", "r")["wandb_mode"] \
        is None
    monkeypatch.setenv("WANDB_MODE", "online")  # a node without it: no key, would go online
    board = WandbLog(cfg, cfg.run_dir, mode=carried)
    assert board.target.startswith("offline ")
    board.close()
