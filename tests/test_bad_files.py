"""Unreadable image files at run time (data.on_bad_file) and image modes that are not bad."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hirl_ray.config import ConfigError, DataConfig, load_config
from hirl_ray.data import ViewDataset, build_dataset, eval_transform
from hirl_ray.data.folder import BadImageFile, ImageFolderDataset

# ---------------------------------------------------------------- files, good and bad


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_png(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)))
    start = data.index(b"IDAT") + 4
    data[start:start + 64] = np.random.default_rng(1).bytes(64)  # the compressed pixels
    return bytes(data)


BAD = {
    "zero_byte.png": lambda: b"",
    "truncated.jpg": lambda: _jpeg(1)[:len(_jpeg(1)) // 2],
    "not_an_image.jpg": lambda: b"name,label\nfoo,1\n",
    "corrupt.png": _corrupt_png,
}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _good(path: Path, value: int) -> None:
    _write(path, _png(np.full((20, 24, 3), value, np.uint8)))


def _folder(root: Path, bad: dict[str, bytes]) -> Path:
    """train/a: 3 good files (values 10, 20, 30) with the bad ones sorted between them."""
    _good(root / "train" / "a" / "0_good.png", 10)
    _good(root / "train" / "a" / "5_good.png", 20)
    _good(root / "train" / "b" / "9_good.png", 30)
    for i, (name, data) in enumerate(bad.items()):
        _write(root / "train" / "a" / f"1_{i}_{name}", data)
    _good(root / "val" / "a" / "0.png", 40)
    return root


def _value(img: Image.Image) -> int:
    return int(np.asarray(img)[0, 0, 0])


# ---------------------------------------------------------------- on_bad_file: error


@pytest.mark.parametrize("name", sorted(BAD))
def test_error_stops_naming_the_file_and_the_fix(tmp_path, name):
    root = _folder(tmp_path, {name: BAD[name]()})
    ds = build_dataset(DataConfig(name="imagefolder", root=str(root)), "train")  # default: error
    bad = next(i for i, p in enumerate(ds.paths) if p.endswith(name))
    assert _value(ds[bad - 1][0]) == 10  # good files still read
    with pytest.raises(BadImageFile, match=rf"cannot read image .*{name} \(.*\); replace or "
                       "delete the file, or set data.on_bad_file=skip") as e:
        ds[bad]
    assert "\n" not in str(e.value)


def test_error_from_a_loader_worker_process_is_one_line_naming_the_file(tmp_path):
    root = _folder(tmp_path, {"zero_byte.png": b""})
    ds = build_dataset(DataConfig(name="imagefolder", root=str(root)), "train")
    loader = DataLoader(ViewDataset(ds, eval_transform(16)), batch_size=2, num_workers=1)
    with pytest.raises(BadImageFile) as e:
        list(loader)
    assert e.value.summary.startswith("cannot read image ")
    assert e.value.summary.endswith("zero_byte.png (UnidentifiedImageError: cannot identify "
                                    f"image file '{ds.paths[1]}'); replace or delete the file, "
                                    "or set data.on_bad_file=skip")


# ---------------------------------------------------------------- on_bad_file: skip


def test_skip_serves_the_next_readable_image_and_counts_each_file_once(tmp_path):
    root = _folder(tmp_path, {k: f() for k, f in BAD.items()})
    ds = build_dataset(DataConfig(name="imagefolder", root=str(root), on_bad_file="skip"),
                       "train")
    assert len(ds) == 3 + len(BAD)
    values = [(_value(img), i) for img, i in (ds[i] for i in range(len(ds)))]
    # The bad files sit between 0_good (10) and 5_good (20): each is served 5_good, keeping its
    # own index (HIRL looks samples up by index).
    assert values == [(10, 0), *((20, i) for i in range(1, 1 + len(BAD))),
                      (20, 1 + len(BAD)), (30, 2 + len(BAD))]
    assert int(ds.bad_file_mask().sum()) == len(BAD)
    assert sorted(Path(p).name.split("_", 2)[2] for p in ds.skipped_files()) == sorted(BAD)
    for i in range(len(ds)):  # a second epoch: same images, no double count
        ds[i]
    assert int(ds.bad_file_mask().sum()) == len(BAD)


def test_skip_wraps_around_and_gives_up_when_nothing_is_readable(tmp_path):
    root = tmp_path
    _write(root / "train" / "a" / "0.png", b"")
    _good(root / "train" / "a" / "1.png", 50)
    _write(root / "train" / "a" / "2.png", b"")
    ds = ImageFolderDataset(root, "train", on_bad_file="skip")
    assert _value(ds.image(2)) == 50  # the last file wraps to the first readable one
    (root / "train" / "a" / "1.png").write_bytes(b"")
    fresh = ImageFolderDataset(root, "train", on_bad_file="skip")
    with pytest.raises(BadImageFile, match="no image of the split could be read"):
        fresh.image(0)


def test_loader_worker_processes_share_the_count(tmp_path):
    from hirl_ray.train.steps import bad_files_skipped

    root = _folder(tmp_path, {k: f() for k, f in BAD.items()})
    ds = build_dataset(DataConfig(name="imagefolder", root=str(root), on_bad_file="skip"),
                       "train")
    loader = DataLoader(ViewDataset(ds, eval_transform(16)), batch_size=1, num_workers=2)
    indices = torch.cat([i for _, i in loader])
    assert sorted(indices.tolist()) == list(range(len(ds)))  # nothing dropped
    # Found in two worker processes, seen here: the count that goes into the epoch metrics.
    assert bad_files_skipped(ds, torch.device("cpu")) == len(BAD)
    assert bad_files_skipped(build_dataset(DataConfig(), "train"), torch.device("cpu")) == 0


def test_s3_image_folders_take_the_same_path(s3_server, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("HIRL_RAY_CACHE", str(tmp_path / "cache"))
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="hirl-bad-files")
    files = {"train/a/0.png": _png(np.full((8, 8, 3), 10, np.uint8)), "train/a/1.png": b"",
             "train/a/2.png": _png(np.full((8, 8, 3), 20, np.uint8)),
             "val/a/0.png": _png(np.full((8, 8, 3), 30, np.uint8))}
    for key, body in files.items():
        s3.put_object(Bucket="hirl-bad-files", Key=f"set/{key}", Body=body)
    cfg = DataConfig(name="imagefolder", root="s3://hirl-bad-files/set")
    with pytest.raises(BadImageFile, match=r"cannot read image .*/set/train/a/1.png"):
        build_dataset(cfg, "train")[1]
    skipping = build_dataset(DataConfig(name="imagefolder", root=cfg.root, on_bad_file="skip"),
                             "train")
    assert [_value(skipping[i][0]) for i in range(3)] == [10, 20, 20]
    assert int(skipping.bad_file_mask().sum()) == 1


def test_on_bad_file_is_checked():
    assert load_config(None).data.on_bad_file == "error"
    with pytest.raises(ConfigError, match="data.on_bad_file must be one of error, skip"):
        load_config(None, {"data.on_bad_file": "ignore"})


def test_the_run_metrics_carry_the_count_as_data_bad_files_skipped():
    from hirl_ray.train.ray_fit import final_metrics

    out = final_metrics({"loss": 1.5, "nan_skipped": 2, "bad_files_skipped": 3},
                        {"knn_acc/class": 0.5})
    assert out == {"train/loss": 1.5, "train/nan_skipped": 2, "data/bad_files_skipped": 3,
                   "knn_acc/class": 0.5}
    assert final_metrics({"loss": 1.0}, {})["data/bad_files_skipped"] == 0  # older checkpoints


def test_a_policy_stop_inside_a_ray_failure_becomes_one_line():
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from hirl_ray.train.ray_fit import policy_stop

    inner = BadImageFile("Caught BadImageFile in DataLoader worker process 0.\nOriginal "
                         "Traceback (most recent call last):\nhirl_ray.data.folder.BadImageFile: "
                         "cannot read image /d/a.jpg (OSError: truncated); replace it")
    failure = WorkerGroupError("rank 1 failed", {
        0: RuntimeError("collateral"), 1: UserExceptionWithTraceback(inner, "tb")})
    stop = policy_stop(failure)
    assert isinstance(stop, BadImageFile)
    assert str(stop) == "cannot read image /d/a.jpg (OSError: truncated); replace it"
    assert policy_stop(WorkerGroupError("x", {0: RuntimeError("other")})) is None


# ---------------------------------------------------------------- modes that are not bad


def _png48(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = rgb16.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _modes_folder(root: Path) -> dict[str, np.ndarray]:
    """One file per mode and the RGB each must give."""
    gray = np.array([[0, 100, 255]], np.uint8)
    g16 = np.array([[0, 257 * 100, 65535]], np.uint16)
    rgba = np.array([[[200, 10, 10, 255], [9, 9, 9, 0], [0, 0, 200, 128]]], np.uint8)
    rgb16 = np.array([[[65535, 0, 257 * 100], [0, 257 * 50, 0], [257, 514, 771]]], np.uint16)
    palette = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * 759)
    buf = io.BytesIO()
    palette.save(buf, "PNG", transparency=2)
    files = {"gray.png": _png(gray), "gray16.png": _png(g16), "rgba.png": _png(rgba, "RGBA"),
             "rgb48.png": _png48(rgb16), "palette_alpha.png": buf.getvalue()}
    for name, data in files.items():
        _write(root / "train" / "a" / name, data)
    return {
        "gray.png": np.repeat(gray[..., None], 3, axis=2),
        "gray16.png": np.array([[[0] * 3, [100] * 3, [255] * 3]], np.uint8),
        # Opaque keeps its colour, transparent shows white, half-transparent blends with white.
        "rgba.png": np.array([[[200, 10, 10], [255, 255, 255], [127, 127, 227]]], np.uint8),
        "rgb48.png": np.array([[[255, 0, 100], [0, 50, 0], [1, 2, 3]]], np.uint8),
        "palette_alpha.png": np.array([[[255, 0, 0], [0, 255, 0], [255, 255, 255]]], np.uint8),
    }


def test_grayscale_rgba_palette_and_16_bit_images_convert_to_rgb(tmp_path):
    expected = _modes_folder(tmp_path)
    ds = ImageFolderDataset(tmp_path, "train")  # on_bad_file=error: none of them is bad
    assert Image.open(ds.paths[[Path(p).name for p in ds.paths].index("gray16.png")]).mode \
        == "I;16"  # the mode Pillow's plain convert("RGB") saturates to white
    for i, path in enumerate(ds.paths):
        img = ds.image(i)
        assert img.mode == "RGB", path
        got = np.asarray(img).astype(int)
        want = expected[Path(path).name].astype(int)
        assert np.abs(got - want).max() <= 1, (Path(path).name, got.tolist())
    assert int(ds.bad_file_mask().sum()) == 0


# ---------------------------------------------------------------- the count in metrics.json


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_fit_skips_bad_files_and_reports_the_count_in_metrics_json(tmp_path):
    import hirl_ray

    from .conftest import tiny_config

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(8):
            _write(root / "train" / c / f"{i}.png", _png(rng.integers(0, 256, (20, 20, 3),
                                                                     dtype=np.uint8)))
        _good(root / "val" / c / "0.png", 90)
    _write(root / "train" / "a" / "3.png", b"")
    _write(root / "train" / "b" / "5.png", _jpeg(2)[:300])
    result = hirl_ray.fit(None, tiny_config(tmp_path, **{
        "data.name": "imagefolder", "data.root": str(root), "data.on_bad_file": "skip",
        "data.loader_workers": 1, "hirl.enabled": False, "train.epochs": 2,
        "train.batch_size": 4}))
    metrics = json.loads((Path(result.run_dir) / "metrics.json").read_text())
    assert metrics["data/bad_files_skipped"] == 2
    assert metrics["train/nan_skipped"] == 0
