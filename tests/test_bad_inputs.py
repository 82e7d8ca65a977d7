"""The bad-input corpus: every malformed experiment or dataset in ``tests/bad_inputs/`` is
refused through a public entry point with one line naming the key or file (and the fix),
before any Ray cluster starts.

A case is an experiment file as a user would write it, headed by comment lines::

    # why: what is wrong (for the reader)
    # entry: fit | tune | cli fit | cli tune | cli eval
    # match: a regular expression the one-line message must contain
    # data: a dataset the fixture below generates, in tmp_path (optional; @DATA@ in the file)
    # args: overrides / CLI arguments (optional; @DATA@ and @TMP@ are substituted)
    # config: the path to pass instead of the case file (optional)
    # requires: s3 (the moto server) | no_gpu (skipped where CUDA shows a GPU)
    #           | wandb (skipped where the wandb package is not installed)

API entries must raise ``ConfigError`` (``FileNotFoundError`` for a missing file); the CLI must
exit 2 with exactly one ``hirl-ray: error: ...`` line on stderr. Datasets (corrupt and empty
files included) are generated in ``tmp_path``: no binary file lives in git.

Also here: what start-up leaves to run time (undecodable images), how odd image modes load,
the single-class decision, the resource checks and the Ray address choice.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from PIL import Image

import hirl_ray
from hirl_ray import cli, resources, runs
from hirl_ray.config import ConfigError, load_config
from hirl_ray.data import TensorHierDataset, register_dataset
from hirl_ray.data.folder import BadImageFile, ImageFolderDataset, load_rgb

CASES = sorted(Path(__file__).parent.joinpath("bad_inputs").glob("*.yaml"))
HEADER = re.compile(r"^# (\w+): (.*)$")
ENTRIES = ("fit", "tune", "cli fit", "cli tune", "cli eval")


def read_case(path: Path) -> tuple[dict[str, str], str]:
    """The ``# key: value`` header and the whole text of a case file."""
    text = path.read_text()
    head = {}
    for line in text.splitlines():
        m = HEADER.match(line)
        if not m:
            break
        head[m.group(1)] = m.group(2).strip()
    return head, text


# ---------------------------------------------------------------- generated datasets

def _png(path: Path, seed: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(path)


def _folder(root: Path, train: dict[str, int] | None = None,
            val: dict[str, int] | None = None) -> Path:
    """``root/{train,val}/<class>/*.png``: 2 classes x 4 train / 2 val images by default, and a
    ``.DS_Store`` (hidden files are never a refusal)."""
    train = {"a": 4, "b": 4} if train is None else train
    val = {"a": 2, "b": 2} if val is None else val
    for split, counts in (("train", train), ("val", val)):
        for c, n in counts.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _png(root / split / c / f"{i}.png", seed=hash((split, c, i)) % 1000)
    (root / "train" / next(iter(train)) / ".DS_Store").write_bytes(b"\0\1junk")
    return root


def _npz(root: Path, **arrays: np.ndarray) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "data.npz", **arrays)
    return root / "data.npz"


def _upload(folder: Path, name: str, extra: dict[str, bytes]) -> str:
    """``folder``'s files, plus ``extra`` objects, under ``s3://hirl-bad-inputs/<name>``."""
    import boto3

    s3, bucket = boto3.client("s3"), "hirl-bad-inputs"
    if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=bucket)
    files = {p.relative_to(folder).as_posix(): p.read_bytes()
             for p in folder.rglob("*") if p.is_file()}
    for key, body in {**files, **extra}.items():
        s3.put_object(Bucket=bucket, Key=f"{name}/{key}", Body=body)
    return f"s3://{bucket}/{name}"


def make_data(kind: str, root: Path) -> Path | str:
    """The dataset ``kind`` (a case's ``# data:``) under ``root`` (or in the moto server's
    bucket); returns what @DATA@ means."""
    if kind == "folder":
        return _folder(root)
    if kind == "file":
        root.mkdir(parents=True)
        (root / "a_file").write_text("not a folder\n")
        return root / "a_file"
    if kind == "folder_no_class_folders":
        for split in ("train", "val"):
            _png(root / split / "0.png", 0)
        return root
    if kind == "folder_empty":
        for split in ("train", "val"):
            for c in "ab":
                (root / split / c).mkdir(parents=True)
        return root
    if kind == "folder_empty_class":
        _folder(root)
        (root / "train" / "c").mkdir()
        return root
    if kind == "folder_no_val":
        _folder(root, val={})
        return root
    if kind == "folder_val_extra_class":
        return _folder(root, val={"a": 2, "z": 2})
    if kind == "folder_zero_byte":
        _folder(root)
        (root / "train" / "a" / "empty.jpg").write_bytes(b"")
        return root
    if kind == "folder_text_file":
        _folder(root)
        (root / "train" / "b" / "notes.txt").write_text("where these came from\n")
        return root
    if kind == "folder_gif":
        _folder(root)
        for split in ("train", "val"):
            Image.new("P", (8, 8)).save(root / split / "a" / "anim.gif")
        return root
    if kind == "folder_single_class":
        return _folder(root, train={"a": 8}, val={"a": 4})
    if kind == "npz_garbage":
        root.mkdir(parents=True)
        (root / "data.npz").write_text("these are not arrays\n")
        return root / "data.npz"
    if kind == "npz_coarse_without_fine":
        return _npz(root, x=np.zeros((10, 8, 8, 3), np.uint8), y_coarse=np.arange(10) % 2)
    if kind == "npz_float_255":
        x = np.linspace(0, 255, 10 * 8 * 8 * 3, dtype=np.float32).reshape(10, 8, 8, 3)
        return _npz(root, x=x, y=np.arange(10) % 2)
    if kind == "s3_folder_zero_byte":  # the moto server is up (the case requires s3)
        return _upload(_folder(root / "local"), root.parent.name,
                       extra={"train/b/broken.png": b""})
    if kind == "run_small_cnn":
        (root / "run").mkdir(parents=True)
        (root / "run" / "config.yaml").write_text(yaml.safe_dump(load_config(None).to_dict()))
        return root
    raise AssertionError(f"no dataset generator {kind!r}")


@pytest.fixture(scope="module", autouse=True)
def unlabelled_toy():
    """``data.name: unlabelled_toy``: 400 images without labels (a user's own data)."""
    from hirl_ray.config import DATASETS

    def build(cfg, split):
        n = 400 if split == "train" else 100
        return TensorHierDataset(torch.zeros(n, 3, 8, 8, dtype=torch.uint8),
                                 np.zeros((n, 0), np.int64), ())

    register_dataset("unlabelled_toy", build, needs_root=False, level_names=())
    yield
    DATASETS.unregister("unlabelled_toy")


# ---------------------------------------------------------------- "no Ray started"

def ray_processes() -> set[int]:
    """PIDs of raylet / gcs_server processes descending from this process (from /proc)."""
    parent, name = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ")".
        name[int(entry.name)] = stat[stat.index("(") + 1:stat.rindex(")")]
        parent[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    me, found = os.getpid(), set()
    for pid in parent:
        p, seen = pid, 0
        while p in parent and p != me and seen < 64:
            p, seen = parent[p], seen + 1
        if p == me and name[pid] in ("raylet", "gcs_server"):
            found.add(pid)
    return found


@pytest.fixture()
def no_ray_started(monkeypatch, tmp_path):
    """Fails the test if a case reached Ray: ``ray.init`` and the two Ray entry points raise,
    and afterwards Ray is as initialised as before and no raylet/GCS was spawned."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow_without_uri.yaml
    for key in [k for k in os.environ if k.startswith("WANDB_")]:  # wandb_online_without_key
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))  # no user settings
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))  # nor a `wandb login` key
    was_initialized = ray.is_initialized()
    if was_initialized:  # a Ray left by an earlier test in this process is not "given"
        monkeypatch.setattr(resources, "ray_given", lambda: False)
    before = ray_processes()

    def reached_ray(*args, **kwargs):
        raise AssertionError("the case was not refused before Ray")

    import hirl_ray.sweep.sweep
    import hirl_ray.train.ray_fit

    monkeypatch.setattr(ray, "init", reached_ray)
    monkeypatch.setattr(hirl_ray.train.ray_fit, "run_fit", reached_ray)
    monkeypatch.setattr(hirl_ray.sweep.sweep, "execute", reached_ray)
    yield
    assert ray.is_initialized() == was_initialized
    assert ray_processes() - before == set()


def test_the_corpus_is_large_and_well_formed():
    assert len(CASES) >= 30
    for path in CASES:
        head, _ = read_case(path)
        assert {"why", "entry", "match"} <= set(head), path.name
        assert head["entry"] in ENTRIES, path.name
        re.compile(head["match"])


def test_ray_process_finder_sees_a_child_raylet(tmp_path):
    """The "no raylet appeared" check can fail: a child named raylet is found."""
    import shutil
    import subprocess

    fake = tmp_path / "raylet"
    shutil.copy(shutil.which("sleep"), fake)
    proc = subprocess.Popen([str(fake), "30"])
    try:
        assert proc.pid in ray_processes()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_refused_with_one_line_before_ray(path, tmp_path, request, capsys, no_ray_started):
    head, text = read_case(path)
    requires = head.get("requires")
    if requires == "no_gpu" and torch.cuda.is_available():
        pytest.skip("a GPU is visible; this case is about a machine without one")
    if requires == "s3":
        request.getfixturevalue("s3_server")
    if requires == "wandb":
        pytest.importorskip("wandb")
    data = make_data(head["data"], tmp_path / "data") if "data" in head else tmp_path / "data"

    def fill(s: str) -> str:
        return s.replace("@DATA@", str(data)).replace("@TMP@", str(tmp_path))

    experiment = tmp_path / path.name
    experiment.write_text(fill(text))
    config = fill(head.get("config", str(experiment)))
    entry = head["entry"]
    args = fill(head.get("args", "")).split()
    if entry != "cli eval":  # results never land in the working directory
        args = [f"storage.path={tmp_path / 'results'}", *args]
    capsys.readouterr()
    if entry.startswith("cli"):
        assert cli.main([entry.split()[1], config, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("hirl-ray: error: ")
        message = err
    else:
        call = hirl_ray.fit if entry == "fit" else hirl_ray.tune
        with pytest.raises((ConfigError, FileNotFoundError)) as info:
            call(config, args)
        message = str(info.value)
        assert "\n" not in message
    assert re.search(head["match"], message), f"{path.name}: {message}"


# ---------------------------------------------------------------- what start-up leaves alone

def test_undecodable_images_pass_startup_and_fail_when_decoded(tmp_path):
    """Start-up does not decode (too slow for ImageNet on the driver): a truncated JPEG and a
    text file named .png pass ``check_data``; decoding them fails, at run time."""
    root = _folder(tmp_path / "data")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="JPEG")
    (root / "train" / "a" / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    (root / "train" / "b" / "corrupt.png").write_text("not a png at all\n")
    cfg = load_config({"data": {"name": "imagefolder", "root": str(root)},
                       "train": {"batch_size": 4}, "hirl": {"num_clusters": [4, 2]}})
    assert runs.check_data(cfg) == 10
    ds = ImageFolderDataset(root, "train")  # data.on_bad_file=error: the file is named
    for name in ("truncated.jpg", "corrupt.png"):
        with pytest.raises(BadImageFile, match=f"cannot read image .*{name}.*on_bad_file=skip"):
            ds.image(next(i for i, p in enumerate(ds.paths) if p.endswith(name)))


def test_grayscale_rgba_palette_and_16_bit_images_load_as_8_bit_rgb(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    deep = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert deep.shape == (64, 64, 3) and deep.dtype == np.uint8
    # PIL's own convert("RGB") clips everything above 255 to white; scaled, the ramp survives.
    np.testing.assert_allclose(deep[..., 0], ramp / 257.0, atol=1)
    for mode in ("L", "LA", "RGBA", "P", "1"):
        _png(tmp_path / f"{mode}.png", 0, mode)
        img = load_rgb(tmp_path / f"{mode}.png")
        assert img.mode == "RGB" and img.size == (8, 8), mode


def test_single_class_data_trains_with_a_warning(tmp_path, caplog):
    """Decision: pretraining needs no labels, so one class is not refused for a fit; the log
    says its label metrics are trivial. (A sweep ranking on them is refused: see the corpus.)"""
    root = _folder(tmp_path / "data", train={"only": 8}, val={"only": 2})
    cfg = load_config({"data": {"name": "imagefolder", "root": str(root)},
                       "train": {"batch_size": 4}, "hirl": {"num_clusters": [4, 2]}})
    with caplog.at_level(logging.WARNING, logger="hirl_ray"):
        facts = runs.inspect_data(cfg)
    assert facts.classes == (1,) and facts.level_names == ("class",)
    assert any("single class at label level class" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- resources

def test_local_resources_are_checked_only_when_hirl_ray_starts_ray(monkeypatch):
    cfg = load_config(None, ["train.use_gpu=true"])
    monkeypatch.setattr(resources, "local_gpu_count", lambda: 2)
    monkeypatch.setattr(resources, "ray_given", lambda: False)
    resources.check_local_resources(cfg)  # 2 workers x 1 GPU fit on 2 GPUs
    monkeypatch.setattr(resources, "local_gpu_count", lambda: 1)
    with pytest.raises(ConfigError, match="needs 2 GPUs but this machine has 1"):
        resources.check_local_resources(cfg)
    monkeypatch.setattr(resources, "ray_given", lambda: True)  # a cluster may add GPU nodes
    resources.check_local_resources(cfg)


def test_ray_given_by_address_or_by_an_earlier_ray_init(monkeypatch):
    class FakeRay:
        initialized = False

        def is_initialized(self):
            return self.initialized

    fake = FakeRay()
    monkeypatch.setitem(__import__("sys").modules, "ray", fake)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not resources.ray_given()
    fake.initialized = True
    assert resources.ray_given()
    fake.initialized = False
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert resources.ray_given()


def test_resource_bundles_count_workers_and_the_actor():
    cfg = load_config(None, ["train.use_gpu=true", "train.num_workers=4", "train.batch_size=8",
                             "train.gpus_per_worker=0.5", "hirl.actor_num_cpus=2"])
    assert resources.resource_bundles(cfg) == [{"CPU": 1.0, "GPU": 0.5}] * 4 + [{"CPU": 2.0}]
    off = load_config(cfg, ["hirl.enabled=false"])
    assert resources.resource_bundles(off) == [{"CPU": 1.0, "GPU": 0.5}] * 4


def test_fit_on_a_given_cluster_waits_for_resources_with_the_configured_timeout(monkeypatch):
    """The wait (and its timeout) is only for a Ray we were given; a local one was checked."""
    from hirl_ray.train import ray_fit

    calls = []
    monkeypatch.setattr(ray_fit, "init_ray", lambda: calls.append("init"))
    monkeypatch.setattr(ray_fit, "wait_for_resources",
                        lambda bundles, timeout: calls.append(("wait", len(bundles), timeout)))
    monkeypatch.setattr(ray_fit, "train_on_ray", lambda *a, **k: calls.append("train"))
    monkeypatch.setattr(ray_fit, "start_stop_flag", lambda name: None)  # the SIGTERM flag actor
    monkeypatch.setattr(ray_fit.ray, "kill", lambda actor: None)

    def evaluation(*args):
        calls.append("eval")
        return ray_fit.FitResult(metrics={}, checkpoint_path="", hierarchy_path=None,
                                 run_dir="/nowhere")

    monkeypatch.setattr(ray_fit, "final_evaluation", evaluation)
    cfg = load_config(None, ["train.resource_timeout_s=42", "train.num_workers=2"])
    monkeypatch.setattr(ray_fit, "ray_given", lambda: True)
    ray_fit.run_fit(cfg, "/nowhere", 100)
    assert calls == ["init", ("wait", 2, 42.0), "train", "eval"]
    calls.clear()
    monkeypatch.setattr(ray_fit, "ray_given", lambda: False)
    ray_fit.run_fit(cfg, "/nowhere", 100)
    assert calls == ["init", "train", "eval"]


def test_describe_bundles_groups_equal_ones():
    from hirl_ray.train.ray_fit import describe_bundles

    text = describe_bundles([{"CPU": 1, "GPU": 1}] * 2 + [{"CPU": 2.0}])
    assert text == "2 x {CPU: 1, GPU: 1} + {CPU: 2}"


@pytest.mark.usefixtures("ray_session")
def test_waiting_for_resources_gives_up_after_the_timeout_and_frees_its_request():
    from hirl_ray.train.ray_fit import wait_for_resources

    wait_for_resources([{"CPU": 1.0}], timeout_s=60)  # placeable: returns
    with pytest.raises(ConfigError, match=r"train\.resource_timeout_s: waited 1s for "
                                          r"2 x \{CPU: 1, GPU: 1\} .*the cluster has \{'CPU'"):
        wait_for_resources([{"CPU": 1.0, "GPU": 1.0}] * 2, timeout_s=1)
    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert "PENDING" not in states and "CREATED" not in states


# ---------------------------------------------------------------- which Ray: by address

def test_a_local_ray_is_started_on_a_chosen_port_that_its_processes_are_told():
    from hirl_ray.train.ray_cluster import plan_ray_start

    start = plan_ray_start({}, 6123, num_cpus=2, dashboard=False)
    assert start.local and start.kwargs["address"] == "local"
    assert start.env == {"RAY_GCS_SERVER_PORT": "6123"}
    assert start.kwargs["runtime_env"] == {
        "env_vars": {"RAY_ADDRESS": "127.0.0.1:6123"},
        "worker_process_setup_hook": "hirl_ray.train.ray_cluster.quiet_without_state_api"}
    assert start.kwargs["num_cpus"] == 2 and start.kwargs["include_dashboard"] is False
    assert "worker_process_setup_hook" not in plan_ray_start({}, 6123).kwargs["runtime_env"]
    # A port the user fixed wins.
    assert plan_ray_start({"RAY_GCS_SERVER_PORT": "7000"}, 6123).env["RAY_GCS_SERVER_PORT"] \
        == "7000"


def test_without_a_dashboard_workers_drop_only_the_cleaners_state_api_warning(caplog):
    import logging

    from hirl_ray.train import ray_cluster

    ray_cluster.quiet_without_state_api()
    ray_cluster.quiet_without_state_api()  # idempotent: one filter
    logger = logging.getLogger(ray_cluster._CLEANER_LOGGER)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=ray_cluster._CLEANER_LOGGER):
        logger.warning("Failed to query Ray Train Controller actor state. State API may be "
                       "temporarily unavailable. Continuing to monitor.")
        logger.warning("Failed to remove placement group abc")
    assert [r.getMessage() for r in caplog.records] == ["Failed to remove placement group abc"]
    logger.filters.clear()


def test_a_given_cluster_is_joined_by_its_address_without_a_local_start():
    from hirl_ray.train.ray_cluster import plan_ray_start

    start = plan_ray_start({"RAY_ADDRESS": "10.0.0.5:6379"}, 6123, num_cpus=2)
    assert not start.local and start.kwargs["address"] == "10.0.0.5:6379"
    assert start.env == {} and "runtime_env" not in start.kwargs and "num_cpus" not in start.kwargs


def test_connect_sets_the_port_only_while_ray_starts_and_reuses_a_connected_ray(monkeypatch):
    from hirl_ray.train import ray_cluster

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs=kwargs, port=os.environ.get("RAY_GCS_SERVER_PORT"))
        return "ctx"

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_GCS_SERVER_PORT", raising=False)
    monkeypatch.setattr(ray_cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_cluster.ray, "init", fake_init)
    assert ray_cluster.connect(dashboard=False) == "ctx"
    address = seen["kwargs"]["runtime_env"]["env_vars"]["RAY_ADDRESS"]
    assert address == f"127.0.0.1:{seen['port']}" and "RAY_GCS_SERVER_PORT" not in os.environ
    monkeypatch.setattr(ray_cluster.ray, "is_initialized", lambda: True)
    seen.clear()
    assert ray_cluster.connect() is None and not seen


# ---------------------------------------------------------------- storage errors

def test_a_missing_bucket_is_not_retried_but_a_transient_error_is():
    from hirl_ray import storage

    calls = []

    def fail(message):
        def fn():
            calls.append(message)
            if len(calls) < 3:
                raise OSError(message)
            return "ok"
        return fn

    with pytest.raises(OSError, match="NO_SUCH_BUCKET"):
        storage.retry(fail("AWS Error NO_SUCH_BUCKET during PutObject"), base_delay_s=0)
    assert len(calls) == 1
    calls.clear()
    assert storage.retry(fail("AWS Error NETWORK_CONNECTION: reset"), base_delay_s=0) == "ok"
    assert len(calls) == 3


def test_a_sweep_on_a_given_cluster_first_waits_for_one_trials_resources(monkeypatch, tmp_path):
    from hirl_ray.sweep import search
    from hirl_ray.sweep.sampling import search_params
    from hirl_ray.sweep.space import tune_spec
    from hirl_ray.train import ray_fit

    class Reached(Exception):
        pass

    def stop(name):
        def fn(*args, **kwargs):
            raise Reached(name, args)
        return fn

    cfg = load_config({"train": {"resource_timeout_s": 7},
                       "tune": {"metric": "knn_acc/superclass",
                                "resources": {"workers_per_trial": 2, "cpus_per_worker": 0.5}}})
    spec = tune_spec(cfg)
    base = {k: v for k, v in cfg.to_dict().items() if k != "tune"}
    monkeypatch.setattr(search, "init_ray_for_sweep", lambda: None)
    monkeypatch.setattr(ray_fit, "wait_for_resources", stop("wait"))
    monkeypatch.setattr(search, "_trainable", stop("tune"))
    monkeypatch.setattr(search, "ray_given", lambda: True)
    with pytest.raises(Reached) as info:
        search.run_sweep(spec, search_params(spec, cfg), tmp_path, base, 100)
    assert info.value.args == ("wait", ([{"CPU": 0.5}, {"CPU": 0.5}], 7.0))
    monkeypatch.setattr(search, "ray_given", lambda: False)
    with pytest.raises(Reached, match="tune"):
        search.run_sweep(spec, search_params(spec, cfg), tmp_path, base, 100)
