"""``data.loader=ray_data``: Ray Data ingest with every training index exactly once an epoch.

Unit tests of the Ray-free bookkeeping (steps, coverage, decode/collate, the S3 listing order),
then 2-worker fits on the built-in set (against the torch loader) and on an S3 image folder.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

import hirl_ray
from hirl_ray.config import load_config
from hirl_ray.data import TensorHierDataset, build_dataset
from hirl_ray.data.ingest import (
    INDEX,
    DecodeViews,
    actor_seed,
    collate_views,
    index_coverage,
    steps_per_epoch,
)
from hirl_ray.train.checkpoint import find_checkpoints, read_meta

from .conftest import tiny_config

torch.set_num_threads(1)


# ---- bookkeeping, no Ray ---------------------------------------------------------------------

def test_coverage_counts_missed_and_repeated_indices():
    assert index_coverage(torch.ones(10, dtype=torch.int32)) == {"index_missed": 0,
                                                                 "index_repeats": 0}
    counts = torch.tensor([1, 0, 2, 1, 0, 3], dtype=torch.int32)
    assert index_coverage(counts) == {"index_missed": 2, "index_repeats": 3}


@pytest.mark.parametrize("n,world,batch,steps", [(192, 2, 16, 6), (193, 2, 16, 6),
                                                 (191, 2, 16, 5), (100, 3, 10, 3)])
def test_steps_per_epoch_is_what_equal_shards_with_drop_last_give(n, world, batch, steps):
    # Reference: streaming_split(equal=True) gives floor(n / world) rows to each worker,
    # iter_torch_batches(drop_last=True) then floor(rows / batch) batches.
    assert steps_per_epoch(n, world, batch) == steps == (n // world) // batch


def _numbered_images(n: int, size: int = 6) -> TensorHierDataset:
    """Image i is filled with the value i: which image a view came from is readable."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size)
    return TensorHierDataset(images.clone(), np.zeros((n, 1)), ("class",))


class _TwoViews:
    """Deterministic 'views': the image as float, and the image plus a random draw."""

    def __call__(self, img: torch.Tensor) -> list[torch.Tensor]:
        return [img.float(), img.float() + torch.rand(())]


def test_decode_views_keeps_each_index_with_its_own_image_and_collates_like_the_loader():
    decode = DecodeViews(_numbered_images(20), _TwoViews(), seed=3)
    index = np.array([7, 2, 19, 2 + 9])
    out = decode({INDEX: index})
    np.testing.assert_array_equal(out[INDEX], index)
    assert out["view_0"].shape == (4, 3, 6, 6) and out["view_0"].dtype == np.float32
    # Row r of every view comes from image index[r], not from a neighbour.
    np.testing.assert_array_equal(out["view_0"][:, 0, 0, 0], index)
    noise = out["view_1"][:, 0, 0, 0] - index
    assert ((noise >= 0) & (noise < 1)).all()
    batch_index, *views = collate_views(out)
    assert batch_index.dtype == torch.long and batch_index.tolist() == index.tolist()
    assert [v.shape for v in views] == [(4, 3, 6, 6)] * 2
    # Augmentations: one continuous stream per actor, seeded once with fresh entropy: a second
    # actor with the same train.seed, or the same actor's next batch, draws other values.
    other = DecodeViews(_numbered_images(20), _TwoViews(), seed=3)({INDEX: index})
    later = decode({INDEX: index})
    assert len({out["view_1"].tobytes(), other["view_1"].tobytes(),
                later["view_1"].tobytes()}) == 3
    assert len({actor_seed(3) for _ in range(100)}) == 100


def test_decode_views_with_one_view_transform_gives_one_column():
    out = DecodeViews(_numbered_images(5), lambda img: img.float(), seed=0)({INDEX: np.arange(5)})
    assert sorted(out) == [INDEX, "view_0"]


def test_bad_loader_value_is_one_line_config_error():
    with pytest.raises(hirl_ray.ConfigError, match=r"^data.loader must be one of torch, "
                                                   r"ray_data, got 'ray'$"):
        load_config(None, {"data.loader": "ray"})
    with pytest.raises(hirl_ray.ConfigError, match=r"^data.ray_data_cpus must be > 0"):
        load_config(None, {"data.ray_data_cpus": 0})


# ---- S3 image folder read object by object --------------------------------------------------

@pytest.fixture()
def pets(s3_server, tmp_path):
    """An ImageFolder in a moto bucket: 2 classes, 8 train images each (a nested folder and
    names whose sort order differs from upload order), 4 val images each; colours encode the
    class and a number."""
    from PIL import Image

    s3 = boto3.client("s3")
    bucket = "hirl-raydata"
    if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=bucket)
    prefix = f"datasets/{tmp_path.name}"
    for split, n in (("train", 8), ("val", 4)):
        for c, cls in enumerate(("dog", "cat")):
            for i in reversed(range(n)):
                name = f"sub/{i}.png" if i % 3 == 0 else f"img{i:02d}.png"
                buf = io.BytesIO()
                colour = (200 * c, 20 * i, 255 - 200 * c)
                Image.new("RGB", (10, 10), colour).save(buf, format="PNG")
                s3.put_object(Bucket=bucket, Key=f"{prefix}/{split}/{cls}/{name}",
                              Body=buf.getvalue())
    return f"s3://{bucket}/{prefix}"


def test_s3_folder_listing_matches_a_downloaded_copy_in_order_and_pixels(pets, tmp_path,
                                                                         monkeypatch):
    from hirl_ray.data.s3 import S3ImageFiles, cache_root

    monkeypatch.setenv("HIRL_RAY_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, {"data.name": "imagefolder", "data.root": pets}).data
    directs = {split: build_dataset(cfg, split, local_copy=False) for split in ("train", "test")}
    assert all(isinstance(d, S3ImageFiles) for d in directs.values())
    assert not (cache_root() / "s3").exists()  # listed only
    for split, direct in directs.items():
        copy = build_dataset(cfg, split)  # downloaded: torchvision's make_dataset order
        assert len(direct) == {"train": 16, "test": 8}[split]
        assert [p.removeprefix("s3://") for p in direct.paths] == \
            [str(Path(p).relative_to(cache_root() / "s3")) for p in copy.paths]
        np.testing.assert_array_equal(direct.labels, copy.labels)
        for i in (0, 5, len(copy) - 1):
            assert np.array_equal(np.asarray(direct.image(i)), np.asarray(copy.image(i)))


# ---- 2-worker fits ---------------------------------------------------------------------------

#: 24 leaves x 8 = 192 training images, 2 epochs of 6 steps (global batch 32: 16 per worker);
#: half a CPU per training worker and per decode actor, so 2 CPUs hold both.
FIT = {"data.train_per_class": 8, "data.test_per_class": 20, "train.epochs": 2,
       "train.cpus_per_worker": 0.5, "data.ray_data_cpus": 0.5}


def _coverage(run_dir: str) -> list[tuple[int, int, int]]:
    return [(read_meta(p).epoch, read_meta(p).metrics["index_missed"],
             read_meta(p).metrics["index_repeats"]) for p in find_checkpoints(run_dir)]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_ray_data_fit_sees_every_index_once_per_epoch_and_learns(tmp_path):
    result = hirl_ray.fit(None, tiny_config(tmp_path, **FIT, **{"data.loader": "ray_data"}))
    # Counted from the (views, index) batches every rank trained on, summed over the ranks.
    assert _coverage(result.run_dir) == [(1, 0, 0), (2, 0, 0)]
    metas = [read_meta(p) for p in find_checkpoints(result.run_dir)]
    assert metas[0].step == 6 and metas[1].step == 12  # train.batch_size / 2 per worker
    assert metas[1].hierarchy_version >= 1  # the clustering pass ran on the Ray Data path
    assert metas[1].metrics["semantic_loss"] > 0  # HIRL trained on the streamed indices
    # The views pair up: SimCLR's loss over the global batch of 32 (63 candidates per anchor)
    # is ln 63 = 4.14 for embeddings that tell no pair apart, as with views of mismatched images;
    # the first epoch's mean was 3.5-3.84 over 20 runs of both loaders. kNN far above chance
    # (12 classes: 0.083). Whether it learns as well as the torch loader is measured over paired
    # seeds by experiments/evidence/loaders.py (README "Input pipeline: Ray Data"): one 12-step
    # fit is too noisy to tell (superclass kNN of either loader spans 0.73-0.99 over seeds).
    assert metas[0].metrics["ssl_loss"] < math.log(63) - 0.2
    assert result.metrics["knn_acc/class"] > 0.2


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_ray")
def test_ray_data_fit_on_an_s3_image_folder_reads_objects_without_a_local_copy(pets, tmp_path):
    from hirl_ray.data.s3 import cache_root

    result = hirl_ray.fit(None, tiny_config(tmp_path, **FIT, **{
        "data.loader": "ray_data", "data.name": "imagefolder", "data.root": pets,
        "data.image_size": 8, "train.batch_size": 8, "hirl.num_clusters": [4, 2]}))
    # 16 training images, global batch 8: 2 steps per epoch, every image once per epoch.
    assert _coverage(result.run_dir) == [(1, 0, 0), (2, 0, 0)]
    assert read_meta(find_checkpoints(result.run_dir)[-1]).step == 4
    assert 0.0 <= result.metrics["knn_acc/class"] <= 1.0
    # Workers, the clustering pass and the final evaluation read objects: nothing downloaded.
    bucket_prefix = pets.removeprefix("s3://")
    assert not (cache_root() / "s3" / bucket_prefix).exists()


def test_a_decode_actor_is_reserved_beside_the_workers(monkeypatch):
    # 2 workers x 1 CPU fill a 2-core machine: Ray Data would get no CPU and the run would wait
    # for ever; refused before Ray starts, naming the keys.
    from hirl_ray import resources

    cfg = load_config(None, {"data.loader": "ray_data", "data.ray_data_cpus": 0.5})
    assert resources.resource_bundles(cfg) == [{"CPU": 1.0}] * 2 + [{"CPU": 0.5}]
    monkeypatch.setattr(resources, "ray_given", lambda: False)
    monkeypatch.setattr(resources.os, "cpu_count", lambda: 2)
    with pytest.raises(hirl_ray.ConfigError, match=r"train.num_workers=2 x train.cpus_per_worker"
                                                   r"=1 \+ data.ray_data_cpus=0.5 needs 2.5 CPUs"):
        resources.check_local_resources(cfg)
    resources.check_local_resources(load_config(cfg, {"train.cpus_per_worker": 0.75}))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_the_ray_dataset_streams_each_index_once_with_its_own_image():
    # Through Ray Data itself (shuffle, decode actors, batching), with the deterministic
    # evaluation transform: every row's view must be exactly its index's image.
    import ray

    from hirl_ray.data import eval_transform
    from hirl_ray.train.ray_data import TRAIN, _Collate, train_datasets, train_source

    cfg = load_config(None, {"data.train_per_class": 2, "train.batch_size": 8,
                             "data.ray_data_cpus": 0.25})
    source = train_source(cfg)
    transform = eval_transform(cfg.data.image_size)
    ds = train_datasets(cfg, ray.put(source), len(source), transform)[TRAIN]
    orders = []
    for _ in range(2):  # two executions: two epochs
        seen = []
        for index, view in ds.iter_torch_batches(batch_size=8, collate_fn=_Collate()):
            for i, v in zip(index.tolist(), view, strict=True):
                assert torch.equal(v, transform(source.image(i))), i
            seen += index.tolist()
        assert sorted(seen) == list(range(len(source)))  # 48 rows, each once
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled every epoch
