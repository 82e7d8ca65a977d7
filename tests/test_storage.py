"""Local vs remote is decided by the storage layer for every scheme, in one place."""

from __future__ import annotations

import pytest

from hirl_ray import storage
from hirl_ray.config import ConfigError, load_config
from hirl_ray.data import build_dataset, dataset_level_names, dataset_size


@pytest.mark.parametrize("uri, scheme, remote", [
    ("s3://bucket/runs", "s3", True),
    ("gs://bucket/runs", "gs", True),
    ("gcs://bucket/runs", "gcs", True),
    ("hdfs://namenode:8020/runs", "hdfs", True),
    ("abfs://container@account.dfs.core.windows.net/runs", "abfs", True),
    ("abfss://container@account.dfs.core.windows.net/runs", "abfss", True),
    ("S3://Bucket/runs", "s3", True),
    ("file:///tmp/runs", "file", False),
    ("/tmp/runs", None, False),
    ("results", None, False),
    ("~/results", None, False),
    ("C://results", None, False),  # a Windows drive, not a scheme
])
def test_scheme_decides_local_or_remote(uri, scheme, remote):
    assert storage.scheme(uri) == scheme
    assert storage.is_remote(uri) is remote


def test_file_uri_is_the_local_folder(tmp_path):
    uri = f"file://{tmp_path}/run"
    storage.write_text(storage.join(uri, "a", "x.txt"), "hello")
    assert (tmp_path / "run" / "a" / "x.txt").read_text() == "hello"
    assert storage.resolve(uri) == str(tmp_path / "run")
    assert storage.list_dir(uri) == [("a", True)]
    with storage.local_dir(f"{uri}/a") as local:
        assert local == tmp_path / "run" / "a"


@pytest.mark.parametrize("root", ["gs://bucket/pets", "hdfs://nn/pets", "abfs://c@a/pets"])
def test_a_remote_data_root_the_data_layer_cannot_read_is_one_clear_error(root, tmp_path,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"data.name": "imagefolder", "data.root": root}).data
    scheme = root.split(":")[0]
    for call in (lambda: dataset_size(cfg, "train"), lambda: build_dataset(cfg, "train")):
        with pytest.raises(ConfigError, match=f"data.root={root}: the data layer cannot read "
                                              f"{scheme}:// yet; use a local path or one of "
                                              "s3://") as err:
            call()
        assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # not treated as a local folder


def test_level_names_known_without_loading_agree_with_the_built_dataset():
    cfg = load_config(None, {"data.train_per_class": 2, "data.test_per_class": 1}).data
    assert dataset_level_names(cfg) == build_dataset(cfg, "train").level_names
    digits = load_config(None, {"data.name": "digits"}).data  # levels come from the data
    assert dataset_level_names(digits) == build_dataset(digits, "train").level_names
