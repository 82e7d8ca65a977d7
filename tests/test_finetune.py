"""Fine-tuning (``finetune``) and semi-supervised (``semisup``) protocols on a tiny CNN.

Toy data: 12-px images whose class is their colour (plus noise), so a backbone + linear head
fine-tuned on them must classify the test split almost perfectly; with labels that have nothing
to do with the images it must stay near chance.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from hirl_ray.config import PROTOCOLS, ConfigError, load_config
from hirl_ray.eval import EvalInputs, level_metric_prefixes, metric_prefixes, run_protocols
from hirl_ray.eval.finetune import FinetuneConfig, FinetuneProtocol, train_classifier
from hirl_ray.eval.semisup import SemisupConfig, balanced_subset

COLOURS = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]],
                       dtype=torch.float32)
FAST = {"epochs": 8, "batch_size": 32}


class ToyImages(Dataset):
    """``(image, index)`` over a float tensor; remembers every row it was asked for."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads.append(int(i))
        return self.images[i], int(i)


def colour_images(classes: np.ndarray, gen: torch.Generator, size: int = 12) -> torch.Tensor:
    base = 1.5 * COLOURS[torch.from_numpy(classes)] - 0.75
    return base[:, :, None, None] + 0.3 * torch.randn(len(classes), 3, size, size, generator=gen)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def toy_inputs(train_per_class: int = 24, test_per_class: int = 8, random_labels: bool = False,
               **kw) -> EvalInputs:
    """6 colour classes (level ``fine``) in 2 groups (``coarse``: classes 0-2 and 3-5)."""
    gen = torch.Generator().manual_seed(1)
    fine_train = np.repeat(np.arange(6), train_per_class)
    fine_test = np.repeat(np.arange(6), test_per_class)
    train, test = colour_images(fine_train, gen), colour_images(fine_test, gen)
    if random_labels:
        rng = np.random.default_rng(2)
        fine_train, fine_test = rng.permutation(fine_train), rng.permutation(fine_test)
    labels = [np.stack([f, f // 3], axis=1) for f in (fine_train, fine_test)]
    pretrained = tiny_cnn()
    return EvalInputs(*labels, ("fine", "coarse"), encoder=lambda: copy.deepcopy(pretrained),
                      train_images=ToyImages(train), test_images=ToyImages(test), **kw)


def test_finetune_learns_a_separable_toy_set_and_stays_at_chance_on_random_labels():
    metrics = run_protocols(["finetune"], toy_inputs(),
                            {"finetune": FinetuneConfig(**FAST)})

    assert set(metrics) == {"finetune_top1/fine", "finetune_top5/fine"}
    assert metrics["finetune_top1/fine"] >= 0.95  # chance is 1/6
    assert metrics["finetune_top5/fine"] >= metrics["finetune_top1/fine"]
    shuffled = FinetuneProtocol(FinetuneConfig(**FAST)).run(toy_inputs(random_labels=True))
    assert shuffled["finetune_top1/fine"] < 0.4


def test_finetune_level_is_configurable_and_checked_against_the_data():
    coarse = FinetuneProtocol(FinetuneConfig(level=1, **FAST)).run(toy_inputs())
    assert set(coarse) == {"finetune_top1/coarse"}  # 2 classes: no top-5
    assert coarse["finetune_top1/coarse"] >= 0.9
    with pytest.raises(ConfigError, match=r"eval.params.finetune.level=2 but the data has 2 "
                                          r"label levels \(fine, coarse\); use 0..1"):
        FinetuneProtocol(FinetuneConfig(level=2)).run(toy_inputs())


def test_trainer_is_seeded_leaves_the_global_rng_alone_and_scales_the_backbone_lr():
    inputs = toy_inputs(train_per_class=4)
    rows, y = np.arange(24), inputs.train_labels[:, 0]
    x = inputs.test_images.images

    def train(seed: int, scale: float = 1.0) -> nn.Sequential:
        cfg = FinetuneConfig(epochs=2, batch_size=8, backbone_lr_scale=scale)
        return train_classifier(inputs.encoder(), 8, 6, inputs.train_images, rows, y, cfg,
                                seed=seed)

    state = torch.get_rng_state()
    with torch.no_grad():
        a, b, c = (train(s)(x) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    initial = inputs.encoder()[0].weight
    assert torch.equal(train(0, scale=0.0)[0][0].weight, initial)
    assert not torch.allclose(train(0, scale=1.0)[0][0].weight, initial)


def test_balanced_subsets_are_balanced_seeded_nested_and_skip_unlabelled_rows():
    y = np.array([0] * 50 + [1] * 30 + [2] * 20 + [-1] * 10 + [3] * 2)
    np.random.seed(123)
    torch.manual_seed(123)
    ten = balanced_subset(y, 0.1, seed=0)  # 102 labelled rows, 4 classes: 3 per class
    one = balanced_subset(y, 0.01, seed=0)

    assert np.bincount(y[ten]).tolist() == [3, 3, 3, 2]  # class 3 has only 2: all of it
    assert np.bincount(y[one]).tolist() == [1, 1, 1, 1]  # at least one per class
    assert (y[ten] >= 0).all() and len(set(ten)) == len(ten)
    assert set(one) <= set(ten)
    np.random.seed(7)
    torch.manual_seed(7)
    assert np.array_equal(balanced_subset(y, 0.1, seed=0), ten)  # global RNGs do not matter
    assert not np.array_equal(balanced_subset(y, 0.1, seed=1), ten)
    assert balanced_subset(np.full(5, -1), 0.1).size == 0


def test_semisup_trains_on_its_subsets_only_and_scores_every_test_row():
    inputs = toy_inputs(feat_dim=8)
    cfg = SemisupConfig(epochs=12, batch_size=16, fractions=(0.05, 0.25))
    metrics = run_protocols(["semisup"], inputs, {"semisup": cfg})

    assert set(metrics) == {f"semisup_{p}pct_top{k}/fine" for p in (5, 25) for k in (1, 5)}
    assert metrics["semisup_25pct_top1/fine"] >= 0.8  # 6 labels per class; chance is 1/6
    fine = inputs.train_labels[:, 0]
    subsets = [balanced_subset(fine, f, seed=0) for f in cfg.fractions]
    assert [len(s) for s in subsets] == [6, 36]
    assert set(inputs.train_images.reads) == set(np.concatenate(subsets))
    # Each test row is read once per fraction, to be scored: none is trained on.
    assert sorted(inputs.test_images.reads) == sorted(list(range(48)) * 2)


@pytest.mark.parametrize("name", ["finetune", "semisup"])
def test_a_protocol_without_the_backbone_says_it_needs_a_checkpoint(name):
    labels = np.repeat(np.arange(6), 4)[:, None]
    inputs = EvalInputs(labels, labels, ("fine",))
    with pytest.raises(ConfigError, match=rf"^eval.protocols: {name} needs the backbone; run "
                                          "it on a checkpoint"):
        run_protocols([name], inputs)


def test_protocols_are_registered_and_their_keys_checked_by_the_strict_loader():
    assert {"finetune", "semisup"} <= set(PROTOCOLS.names())
    assert PROTOCOLS.get("finetune").needs_backbone and PROTOCOLS.get("semisup").needs_backbone
    assert load_config(None).eval.protocols == ("knn", "clustering", "consistency")  # opt-in
    # Fine-tuning scores one level: its keys are not per-level metric prefixes (not tune metrics).
    assert level_metric_prefixes()[:4] == ("knn_acc", "nmi", "ari", "acc")
    tuned = {"finetune_top1", "semisup_1pct_top1", "semisup_10pct_top5"}
    assert tuned <= set(metric_prefixes()) and not tuned & set(level_metric_prefixes())
    cfg = load_config(None, {"eval.protocols": ["knn", "finetune", "semisup"],
                             "eval.params.finetune.optimizer": "adamw",
                             "eval.params.semisup.fractions": [0.02]})
    assert cfg.eval.params["finetune"] == FinetuneConfig(optimizer="adamw")
    assert cfg.eval.params["semisup"] == SemisupConfig(fractions=(0.02,))
    assert load_config(cfg.to_dict()) == cfg
    bad = {"finetune.bogus": (1, r"unknown key eval.params.finetune.bogus; valid keys: "),
           "semisup.lr_head": (1, r"unknown key eval.params.semisup.lr_head; valid keys: "),
           "finetune.optimizer": ("adam", r"eval.params.finetune.optimizer must be one of sgd, "),
           "semisup.fractions": ([0.1, 1.5], r"eval.params.semisup.fractions must each be in "),
           "finetune.crop_scale": ([0.9, 0.5], r"eval.params.finetune.crop_scale must be \[min"),
           "semisup.level": (-1, r"eval.params.semisup.level must be >= 0")}
    for key, (value, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, {"eval.protocols": ["finetune", "semisup"],
                               f"eval.params.{key}": value})
