"""Tests for hirl_ray.data: the synthetic hierarchy, file/array sources and the transforms."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from hirl_ray.config import ConfigError, DataConfig
from hirl_ray.data import (
    DATASETS,
    MEAN,
    STD,
    HierDataset,
    ViewDataset,
    build_dataset,
    eval_transform,
    label_parents,
    multi_view_transform,
)
from hirl_ray.data.synthetic import LEVEL_NAMES, SyntheticHierarchy, generate

torch.set_num_threads(1)


def _small(split: str = "train", seed: int = 0, size: int = 32) -> HierDataset:
    cfg = DataConfig(train_per_class=10, test_per_class=6, seed=seed, image_size=size)
    return build_dataset(cfg, split)


def _hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images}


# ---------------------------------------------------------------- synthetic


def test_synthetic_default_sizes_and_shapes():
    # Speed is a benchmark's business (no timed asserts here: the machine may be loaded).
    train = build_dataset(DataConfig(), "train")
    test = build_dataset(DataConfig(), "test")
    assert (len(train), len(test)) == (2400, 960)
    assert isinstance(train, SyntheticHierarchy)
    img, idx = train[5]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and idx == 5
    assert train.labels.dtype == np.int64 and train.labels.shape == (2400, 3)
    assert train.level_names == LEVEL_NAMES == ("subclass", "class", "superclass")
    # balanced: every leaf has exactly train_per_class / test_per_class images
    assert np.bincount(train.labels[:, 0], minlength=24).tolist() == [100] * 24
    assert np.bincount(test.labels[:, 0], minlength=24).tolist() == [40] * 24
    # images use the dynamic range (not blank / saturated)
    assert 20 < train.images.float().mean() < 200 and train.images.float().std() > 20


def test_synthetic_deterministic_per_seed_and_differs_across_seeds():
    a, b, c = _small(seed=3), _small(seed=3), _small(seed=4)
    assert torch.equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert not _hashes(a.images) & _hashes(c.images)


def test_synthetic_train_and_test_share_no_image():
    cfg = DataConfig(train_per_class=6, test_per_class=6)  # equal sizes: same draws if same stream
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    h_train, h_test = _hashes(train.images), _hashes(test.images)
    assert len(h_train) == len(train) and len(h_test) == len(test)  # no duplicates either
    assert not h_train & h_test


def test_synthetic_other_image_size():
    ds = _small(size=48)
    assert ds.images.shape == (240, 3, 48, 48)


def test_label_tree_is_consistent():
    ds = _small()
    parents = label_parents(ds.labels, ds.level_names)
    assert len(parents) == 2
    for got, want in zip(parents, SyntheticHierarchy.label_tree, strict=True):
        np.testing.assert_array_equal(got, want)
    sub_to_class, class_to_super = parents
    assert sub_to_class.shape == (24,) and class_to_super.shape == (12,)
    # 2 sub-classes per class, 3 classes per super-class, every label used
    assert np.bincount(sub_to_class).tolist() == [2] * 12
    assert np.bincount(class_to_super).tolist() == [3] * 4
    # the labels chain through the parent maps for every sample
    np.testing.assert_array_equal(sub_to_class[ds.labels[:, 0]], ds.labels[:, 1])
    np.testing.assert_array_equal(class_to_super[ds.labels[:, 1]], ds.labels[:, 2])
    assert SyntheticHierarchy.leaf_name(0) == "red disc/solid/small"


def test_label_parents_rejects_non_tree():
    labels = np.array([[0, 0], [1, 0], [1, 1]])
    with pytest.raises(ConfigError, match="class 1 has several superclass parents"):
        label_parents(labels, ("class", "superclass"))
    assert label_parents(np.zeros((4, 1), dtype=np.int64)) == ()


def _simple_stats(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Cheap rotation/translation-invariant statistics of the bright foreground object."""
    x = images.numpy().astype(np.float32) / 255
    side = x.shape[-1]
    mask = (x.max(1) > 0.5).astype(np.float32)
    area = mask.sum((1, 2)) + 1e-6
    g = np.arange(side) + 0.5
    cy = (mask * g[None, :, None]).sum((1, 2)) / area
    cx = (mask * g[None, None, :]).sum((1, 2)) / area
    dist = np.hypot(g[None, :, None] - cy[:, None, None], g[None, None, :] - cx[:, None, None])
    dist = dist / np.sqrt(area)[:, None, None]
    edges = np.linspace(0, 1.5, 11)
    radial = (
        np.stack(
            [
                (mask * ((dist >= lo) & (dist < hi))).sum((1, 2))
                for lo, hi in zip(edges[:-1], edges[1:], strict=True)
            ],
            1,
        )
        / area[:, None]
    )
    colour = (x * mask[:, None]).sum((2, 3)) / area[:, None]
    lum = x.mean(1)
    lap = np.abs(
        4 * lum[:, 1:-1, 1:-1]
        - lum[:, :-2, 1:-1]
        - lum[:, 2:, 1:-1]
        - lum[:, 1:-1, :-2]
        - lum[:, 1:-1, 2:]
    )
    texture = (lap * mask[:, 1:-1, 1:-1]).sum((1, 2)) / area
    return {
        "radial": radial,
        "colour": colour / colour.sum(1, keepdims=True),
        "texture": texture[:, None],
        "size": np.sqrt(area)[:, None] / side,
    }


def _nearest_centroid_acc(train_x, train_y, test_x, test_y) -> float:
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    centroids = np.stack([a[train_y == c].mean(0) for c in range(train_y.max() + 1)])
    pred = ((b[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((pred == test_y).mean())


def test_every_level_is_visually_separable():
    """Guards against a degenerate generator: simple image statistics must separate every
    level on held-out images, far above chance (1/4, 1/12, 1/24)."""
    tr_img, tr_lab = generate(30, 32, seed=0, split="train")
    te_img, te_lab = generate(20, 32, seed=0, split="test")
    tr, te = _simple_stats(tr_img), _simple_stats(te_img)
    both = [np.concatenate(list(s.values()), 1) for s in (tr, te)]
    acc = [
        _nearest_centroid_acc(both[0], tr_lab[:, lvl], both[1], te_lab[:, lvl]) for lvl in range(3)
    ]
    assert acc[2] > 0.9 and acc[1] > 0.8 and acc[0] > 0.6, acc
    # The super-class must not be carried by colour alone (grayscale views, p=0.2): the
    # colour-free silhouette statistics identify it too.
    shape_acc = _nearest_centroid_acc(tr["radial"], tr_lab[:, 2], te["radial"], te_lab[:, 2])
    assert shape_acc > 0.45, shape_acc
    # Nuisances: objects are not all at the same place/size within a leaf class.
    leaf0 = tr_img[torch.from_numpy(tr_lab[:, 0] == 0)].float()
    assert leaf0.std(0).mean() > 10


# ---------------------------------------------------------------- views and transforms


def test_items_return_their_index_through_views_and_loader():
    ds = _small("test")
    assert [ds[i][1] for i in (0, 7, len(ds) - 1)] == [0, 7, len(ds) - 1]
    views = ViewDataset(ds, multi_view_transform(32))
    assert len(views) == len(ds) and views.labels is ds.labels
    loader = DataLoader(
        views, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    seen = []
    for (v1, v2), idx in loader:
        assert v1.shape == v2.shape == (len(idx), 3, 32, 32) and type(v1) is torch.Tensor
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(len(ds)))


def test_multi_view_transform_tensor_and_pil():
    torch.manual_seed(0)
    ds = _small()
    img = ds[0][0]
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    for size in (32, 96):  # 96 also exercises the blur branch
        t = multi_view_transform(size, num_views=2)
        for source in (img, pil):
            views = t(source)
            assert isinstance(views, list) and len(views) == 2
            for v in views:
                assert type(v) is torch.Tensor and v.dtype == torch.float32
                assert v.shape == (3, size, size) and torch.isfinite(v).all()
            assert not torch.allclose(views[0], views[1])
    assert len(multi_view_transform(32, num_views=3)(img)) == 3
    # grayscale PIL input still gives 3 channels
    assert multi_view_transform(32)(pil.convert("L"))[0].shape == (3, 32, 32)
    batch = default_collate([(multi_view_transform(32)(img), 0)] * 4)
    assert batch[0][0].shape == (4, 3, 32, 32)
    pickle.loads(pickle.dumps(ViewDataset(ds, multi_view_transform(32))))  # ships to workers


def test_eval_transform():
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    img = _small()[0][0]
    out = eval_transform(32)(img)
    # same size: just scale to [0, 1] and normalise
    torch.testing.assert_close(out, (img.float() / 255 - mean) / std)
    # a bigger non-square PIL image: resize short side to 32/0.875 = 37, center-crop 32
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))
    out = eval_transform(32)(pil)
    assert type(out) is torch.Tensor and out.shape == (3, 32, 32)
    torch.testing.assert_close(out, eval_transform(32)(pil))  # deterministic
    small = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    assert eval_transform(32)(small).shape == (3, 32, 32)
    # the 37-px resize then crop keeps the central 32/37 of the image: check the crop
    # against torchvision's own resize of the whole picture
    from torchvision.transforms.v2 import functional as F

    ref = F.center_crop(F.resize(F.pil_to_tensor(pil), [37], antialias=True), [32, 32])
    torch.testing.assert_close(out, (ref.float() / 255 - mean) / std)


# ---------------------------------------------------------------- imagefolder


def _write_folder(root, split, classes, n=3, mode="RGB"):
    rng = np.random.default_rng(len(split))
    for c in classes:
        (root / split / c).mkdir(parents=True)
        for i in range(n):
            shape = (20, 24, 3) if mode == "RGB" else (20, 24)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_imagefolder(tmp_path):
    _write_folder(tmp_path, "train", ["cat", "dog"])
    _write_folder(tmp_path, "val", ["dog"], n=2, mode="L")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path))
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) == 6 and train.labels.shape == (6, 1) and train.level_names == ("class",)
    assert sorted(train.labels[:, 0].tolist()) == [0, 0, 0, 1, 1, 1]
    assert test.labels[:, 0].tolist() == [1, 1]  # "dog" keeps its train index
    img, idx = test[1]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and idx == 1
    assert eval_transform(16)(img).shape == (3, 16, 16)


def test_imagefolder_missing_or_empty_split(tmp_path):
    _write_folder(tmp_path, "train", ["a"])
    cfg = DataConfig(name="imagefolder", root=str(tmp_path))
    with pytest.raises(ConfigError, match=r"data.root=.*missing test split folder.*val/ or"):
        build_dataset(cfg, "test")
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no images"):
        build_dataset(cfg, "test")
    with pytest.raises(ConfigError, match="is not a folder"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "nope")), "train")


# ---------------------------------------------------------------- npz


def test_npz_single_file_round_trip(tmp_path):
    n = 50
    # every image is constant = its index, so we can tell which ones each split got
    x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 8, 8, 3)).copy()
    y = np.arange(n) % 5
    np.savez(tmp_path / "d.npz", x=x, y=y, y_coarse=y % 2)
    cfg = DataConfig(name="npz", root=str(tmp_path / "d.npz"), image_size=8, seed=1)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (40, 10)
    ids = [int(ds.images[i, 0, 0, 0]) for ds in (train, test) for i in range(len(ds))]
    assert sorted(ids) == list(range(n))  # disjoint, complete
    assert train.level_names == ("class", "superclass")
    for i in range(len(train)):
        k = int(train.images[i, 0, 0, 0])
        assert train.labels[i].tolist() == [y[k], y[k] % 2]
    again = build_dataset(cfg, "test")
    assert torch.equal(again.images, test.images)  # deterministic split
    other = build_dataset(DataConfig(name="npz", root=cfg.root, image_size=8, seed=2), "test")
    assert not torch.equal(other.images, test.images)


def test_npz_folder_float_nchw_grayscale_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.random((6, 3, 10, 10)), y=np.arange(6))
    np.savez(
        tmp_path / "test.npz", x=rng.integers(0, 256, (4, 10, 10), dtype=np.uint8), y=np.arange(4)
    )
    cfg = DataConfig(name="npz", root=str(tmp_path), image_size=16)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert train.images.shape == (6, 3, 16, 16) and test.images.shape == (4, 3, 16, 16)
    assert train.labels.shape == (6, 1) and train.level_names == ("class",)
    assert torch.equal(test.images[:, 0], test.images[:, 2])  # grayscale replicated


def test_npz_errors_name_file_and_array(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 5, 6, 7), dtype=np.uint8), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(ConfigError, match=r"bad\.npz: array 'x' must have shape"):
        build_dataset(DataConfig(name="npz", root=str(bad)), "train")
    np.savez(bad, x=np.zeros((4, 5, 5, 3), dtype=np.uint8), y=np.zeros(3, dtype=np.int64))
    with pytest.raises(ConfigError, match=r"bad\.npz: array 'y' must be .* shape \(4,\)"):
        build_dataset(DataConfig(name="npz", root=str(bad)), "train")
    np.savez(bad, x=np.full((4, 5, 5, 3), 2.0), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(ConfigError, match=r"bad\.npz: array 'x': float images must lie in"):
        build_dataset(DataConfig(name="npz", root=str(bad)), "train")
    np.savez(
        bad,
        x=np.zeros((4, 5, 5, 3), dtype=np.uint8),
        y=np.array([0, 0, 1, 1]),
        y_coarse=np.array([0, 1, 1, 1]),
    )
    with pytest.raises(ConfigError, match="not a tree"):
        build_dataset(DataConfig(name="npz", root=str(bad)), "train")
    with pytest.raises(ConfigError, match="missing test.npz"):
        build_dataset(DataConfig(name="npz", root=str(tmp_path)), "test")


# ---------------------------------------------------------------- cifar, digits, registry


def test_cifar_missing_files_says_where_to_download(tmp_path):
    for name in ("cifar10", "cifar100"):
        with pytest.raises(ConfigError, match=rf"data.root={tmp_path}: {name} not found.*download"):
            build_dataset(DataConfig(name=name, root=str(tmp_path)), "train")


def test_cifar100_reads_coarse_labels(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    # A tiny fake copy in the real file layout; skip torchvision's md5 checks for it.
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    fine = np.arange(6) * 7 % 100
    entry = {
        "data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
        "fine_labels": fine.tolist(),
        "coarse_labels": (fine // 5).tolist(),
    }
    for file_name in ("train", "test"):
        (folder / file_name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)]}))
    ds = build_dataset(DataConfig(name="cifar100", root=str(folder), image_size=16), "test")
    assert ds.images.shape == (6, 3, 16, 16) and ds.level_names == ("class", "superclass")
    assert ds.labels.tolist() == np.stack([fine, fine // 5], 1).tolist()
    raw = build_dataset(DataConfig(name="cifar100", root=str(tmp_path)), "train")
    expected = entry["data"].reshape(6, 3, 32, 32)
    assert torch.equal(raw.images, torch.from_numpy(expected))


def test_digits():
    cfg = DataConfig(name="digits", image_size=16, seed=0)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) + len(test) == 1797 and 0.15 < len(test) / 1797 < 0.25
    assert train.images.shape == (len(train), 3, 16, 16) and train.images.dtype == torch.uint8
    assert set(np.unique(train.labels).tolist()) == set(range(10))
    assert train.images.max() > 200 and train[0][1] == 0
    assert not _hashes(train.images) & _hashes(test.images)  # sklearn's 1797 are all distinct
    assert torch.equal(build_dataset(cfg, "test").images, test.images)


def _fake_stl10(root, splits=(("train", 5), ("test", 3)), seed=0):
    """A tiny copy in STL-10's binary layout: column-major 3x96x96 uint8, labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in splits:
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        labels = rng.integers(1, 11, n, dtype=np.uint8)
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # W-major on disk
        labels.tofile(folder / f"{split}_y.bin")
        written[split] = images, labels
    return folder, written


def test_stl10_reads_the_binary_layout_like_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.stl10 as stl10

    folder, written = _fake_stl10(tmp_path)
    for split, (images, labels) in written.items():
        ds = build_dataset(DataConfig(name="stl10", root=str(tmp_path), image_size=96), split)
        assert ds.level_names == ("class",) and ds.labels[:, 0].tolist() == (labels - 1).tolist()
        assert torch.equal(ds.images, torch.from_numpy(images))
    # torchvision's reader agrees (its MD5 check skipped for the fake files)
    monkeypatch.setattr(stl10.STL10, "_check_integrity", lambda self: True)
    ref = stl10.STL10(str(tmp_path), split="test", download=False)
    assert np.array_equal(ref.data, written["test"][0]) and np.array_equal(ref.labels,
                                                                           ds.labels[:, 0])
    small = build_dataset(DataConfig(name="stl10", root=str(folder), image_size=24), "train")
    assert small.images.shape == (5, 3, 24, 24) and small.images.dtype == torch.uint8


def test_stl10_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"STL-10 not found .*stl10_binary/train_X.bin"):
        build_dataset(DataConfig(name="stl10", root=str(tmp_path)), "train")
    folder, _ = _fake_stl10(tmp_path, splits=(("train", 2),))
    with pytest.raises(ConfigError, match="missing test_X.bin"):
        build_dataset(DataConfig(name="stl10", root=str(tmp_path)), "test")
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(ConfigError, match=r"train_y.bin: expected 2 labels in 1..10"):
        build_dataset(DataConfig(name="stl10", root=str(tmp_path)), "train")
    (folder / "train_y.bin").write_bytes(bytes([1, 11]))
    with pytest.raises(ConfigError, match=r"got 2 in \[1, 11\]"):
        build_dataset(DataConfig(name="stl10", root=str(tmp_path)), "train")
    (folder / "train_X.bin").write_bytes(bytes(100))
    with pytest.raises(ConfigError, match="train_X.bin: 100 bytes is not a whole number"):
        build_dataset(DataConfig(name="stl10", root=str(tmp_path)), "train")


def test_build_dataset_errors():
    assert DATASETS.names() == ("synthetic", "imagefolder", "npz", "cifar10", "cifar100", "digits",
                                "stl10")
    with pytest.raises(ConfigError, match="data.name must be one of"):
        build_dataset(DataConfig(name="mnist"), "train")
    with pytest.raises(ConfigError, match="data.root is required"):
        build_dataset(DataConfig(name="npz"), "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset(DataConfig(), "val")
