"""storage.path=s3://… against a real S3 endpoint (moto server on 127.0.0.1)."""

from __future__ import annotations

import boto3
import pytest

import hirl_ray
from hirl_ray import storage
from hirl_ray.train.checkpoint import find_checkpoints, read_meta

from .conftest import S3_SECRET, tiny_config

pytestmark = pytest.mark.usefixtures("fresh_ray")


@pytest.fixture()
def bucket(s3_server):
    name = "hirl-results"
    s3 = boto3.client("s3")
    if name not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=name)
    return name


def test_storage_round_trip_on_s3(bucket):
    root = f"s3://{bucket}/unit"
    storage.write_text(storage.join(root, "a", "x.txt"), "hello")
    assert storage.read_text(f"{root}/a/x.txt") == "hello"
    assert storage.list_dir(root) == [("a", True)]
    assert storage.exists(f"{root}/a/x.txt") and not storage.exists(f"{root}/a/y.txt")
    with storage.local_dir(f"{root}/a") as local:
        assert (local / "x.txt").read_text() == "hello"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{root}/missing")


def test_unwritable_bucket_fails_before_ray_starts(s3_server):
    with pytest.raises(hirl_ray.ConfigError, match="storage.path s3://no-such-bucket-hirl/x/run "
                                                   "is not writable"):
        hirl_ray.fit(None, {"storage.path": "s3://no-such-bucket-hirl/x", "storage.name": "run"})


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_fit_on_s3_then_resume_from_s3(bucket, tmp_path):
    overrides = tiny_config(tmp_path, **{"storage.path": f"s3://{bucket}/runs",
                                         "storage.name": "s3run", "train.epochs": 2})
    first = hirl_ray.fit(None, overrides)
    run = f"s3://{bucket}/runs/s3run"
    assert first.run_dir == run and first.checkpoint_path == f"{run}/train/epoch_0002"
    assert [read_meta(p).epoch for p in find_checkpoints(run)] == [1, 2]
    assert first.hierarchy_path is not None and first.hierarchy_path.startswith(f"{run}/hierarchy/")
    steps = read_meta(f"{run}/train/epoch_0002").step

    resumed = hirl_ray.fit(None, {**overrides, "train.epochs": 3})
    assert [read_meta(p).epoch for p in find_checkpoints(run)] == [1, 2, 3]
    third = read_meta(f"{run}/train/epoch_0003")
    assert third.step == steps + steps // 2  # continued, not restarted
    assert "knn_acc/superclass" in resumed.metrics

    backbone, _ = hirl_ray.load_backbone(run)
    assert sum(p.numel() for p in backbone.parameters()) > 0

    # Credentials are never written next to the results.
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/s3run")["Contents"]]
    assert any(k.endswith("metrics.json") for k in keys) and any("config.yaml" in k for k in keys)
    # Watching it (issue 16): rank 0's status.json and the TensorBoard events copied to S3.
    assert any("/tensorboard/events.out.tfevents" in k for k in keys)
    from hirl_ray.status import format_status, read_status

    status = read_status(run)
    assert (status["state"], status["epoch"], status["last_checkpoint"]) == \
        ("finished", 3, "epoch_0003")
    assert "State        finished" in format_status(run, status)
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert S3_SECRET.encode() not in body, key


def test_imagefolder_dataset_read_from_s3_prefix_and_cached(bucket, tmp_path, monkeypatch):
    import io

    from PIL import Image

    from hirl_ray.config import load_config
    from hirl_ray.data import build_dataset

    monkeypatch.setenv("HIRL_RAY_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3")
    for split in ("train", "val"):
        for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(3):
                buf = io.BytesIO()
                Image.new("RGB", (12, 12), colour).save(buf, format="PNG")
                s3.put_object(Bucket=bucket, Key=f"datasets/pets/{split}/{cls}/{i}.png",
                              Body=buf.getvalue())
    cfg = load_config(None, {"data.name": "imagefolder", "data.root": f"s3://{bucket}/datasets/pets",
                             "data.image_size": 8}).data
    train = build_dataset(cfg, "train")
    assert len(train) == 6 and sorted(set(train.labels[:, 0])) == [0, 1]
    image, index = train[4]
    assert index == 4 and image.size == (12, 12)
    cached = tmp_path / "cache" / "s3" / bucket / "datasets" / "pets"
    stamp = (cached / "train" / "dog" / "2.png").stat().st_mtime_ns
    test = build_dataset(cfg, "test")  # the other split: served from the same cached copy
    assert len(test) == 6
    assert (cached / "train" / "dog" / "2.png").stat().st_mtime_ns == stamp  # not re-fetched
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(hirl_ray.ConfigError, match="data.root=s3://"):
        build_dataset(cfg, "test")


def test_missing_s3_dataset_prefix_is_one_clear_error(bucket, tmp_path, monkeypatch):
    from hirl_ray.config import load_config
    from hirl_ray.data import build_dataset

    monkeypatch.setenv("HIRL_RAY_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, {"data.name": "imagefolder",
                             "data.root": f"s3://{bucket}/nothing-here"}).data
    with pytest.raises(hirl_ray.ConfigError, match="holds no objects"):
        build_dataset(cfg, "train")


def test_driver_counts_an_s3_image_folder_without_downloading_it(bucket, tmp_path, monkeypatch):
    from hirl_ray.config import load_config
    from hirl_ray.data import build_dataset, dataset_level_names, dataset_size

    monkeypatch.setenv("HIRL_RAY_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3")
    keys = ["train/cat/0.png", "train/cat/1.JPG", "train/dog/sub/2.png", "train/dog/notes.txt",
            "train/README.png", "val/cat/0.png", "val/dog/1.png"]
    import io

    from PIL import Image

    for key in keys:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="PNG")
        s3.put_object(Bucket=bucket, Key=f"datasets/count/{key}", Body=buf.getvalue())
    cfg = load_config(None, {"data.name": "imagefolder",
                             "data.root": f"s3://{bucket}/datasets/count"}).data
    assert dataset_size(cfg, "train") == 3 and dataset_size(cfg, "test") == 2
    levels = dataset_level_names(cfg)  # what a sweep's driver checks tune.metric against
    assert not (tmp_path / "cache").exists()  # listed, nothing downloaded
    # The same number and label levels the workers get from their downloaded copy.
    train = build_dataset(cfg, "train")
    assert len(train) == 3 and train.level_names == levels == ("class",)
