"""A new method is one file: a toy multi-crop method defined here, without touching the library.

The toy brings its own ``Config`` (a key the library does not know), three views of two
resolutions (``transform``), its own parameter groups (no weight decay on norms and biases, a
projector with twice the learning rate) and an ``after_backward`` hook (gradient clipping).
It trains through ``train_epoch`` (fast) and through ``hirl_ray.fit`` on Ray, whose workers
import this module to parse the config (``train.steps.registering_modules``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from hirl_ray.config import METHODS, ConfigError, check_positive, load_config
from hirl_ray.data import ViewDataset, build_dataset
from hirl_ray.data.transforms import MultiViewTransform, simclr_view
from hirl_ray.losses import nt_xent_loss
from hirl_ray.methods import (
    HirlModel,
    MethodOutput,
    ProjectorConfig,
    SSLMethod,
    register_method,
    split_weight_decay,
)
from hirl_ray.models import forward_by_resolution, mlp
from hirl_ray.train.checkpoint import read_meta
from hirl_ray.train.loop import StaticHierarchy, train_epoch
from hirl_ray.train.optim import build_optimizer
from hirl_ray.train.steps import registering_modules

from .conftest import tiny_config

NAME = "toy_multicrop"


@dataclass(frozen=True)
class ToyConfig(ProjectorConfig):
    """``method:`` keys of the toy: NT-Xent τ, the local crop's side and a clipping norm."""

    name: str = NAME
    temperature: float = 0.5
    local_size: int = 16
    clip_grad: float = 3.0

    def check(self, where: str) -> None:
        super().check(where)
        check_positive(self, where, "temperature", "local_size", "clip_grad")


@register_method
class ToyMultiCrop(SSLMethod):
    """Two global views and one smaller local view; NT-Xent over every pair of views."""

    name: ClassVar[str] = NAME
    Config = ToyConfig

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: ToyConfig) -> None:
        super().__init__(backbone, feat_dim, cfg)
        self.projector = mlp(feat_dim, cfg.hidden_dim, cfg.proj_dim)
        self.hook_calls: list[tuple[int, int]] = []

    def transform(self, data_cfg) -> MultiViewTransform:
        size = data_cfg.image_size
        return MultiViewTransform([simclr_view(size), simclr_view(size),
                                   simclr_view(self.cfg.local_size, scale=(0.05, 0.4))])

    def param_groups(self) -> list[dict[str, Any]]:
        return [*split_weight_decay(self.backbone.named_parameters()),
                {"params": list(self.projector.parameters()), "lr_scale": 2.0}]

    def after_backward(self, step: int, epoch: int) -> None:
        self.hook_calls.append((step, epoch))
        nn.utils.clip_grad_norm_(self.parameters(), self.cfg.clip_grad)

    def forward(self, views: list[Tensor]) -> MethodOutput:
        self._check_views(views, 3)
        b = views[0].shape[0]
        h = forward_by_resolution(self.backbone, views)  # two passes: 2 global, 1 local
        z = self.projector(h).split(b)
        pairs = list(combinations(range(len(views)), 2))
        loss = sum(nt_xent_loss(z[i], z[j], self.cfg.temperature) for i, j in pairs) / len(pairs)
        return MethodOutput(loss=loss, embedding=h[:b], projection=z[0])

    def clustering_encoder(self) -> tuple[nn.Module, nn.Module]:
        return self.backbone, self.projector


@pytest.fixture(scope="module", autouse=True)
def _unregister_at_the_end():
    yield
    METHODS.unregister(NAME)


def toy_overrides(**extra: Any) -> dict[str, Any]:
    return {"method.name": NAME, "method.local_size": 12, "model.width": 8,
            "method.hidden_dim": 32, "method.proj_dim": 16, "data.train_per_class": 2,
            "hirl.num_clusters": [6, 2], "hirl.num_neg_paths": 4, **extra}


def test_toy_config_is_parsed_by_the_strict_loader() -> None:
    cfg = load_config(None, toy_overrides())
    assert isinstance(cfg.method, ToyConfig) and cfg.method.local_size == 12
    with pytest.raises(ConfigError, match=r"method\.clip_grad must be > 0"):
        load_config(None, toy_overrides(**{"method.clip_grad": 0}))
    with pytest.raises(ConfigError, match=r"unknown key method\.queue_size"):
        load_config(None, toy_overrides(**{"method.queue_size": 8}))
    assert registering_modules(cfg)[0] == __name__  # what a Ray worker imports first


def test_toy_trains_a_step_through_train_epoch_with_its_views_groups_and_hook() -> None:
    torch.manual_seed(0)
    cfg = load_config(None, toy_overrides(**{"train.lr": 0.1, "train.weight_decay": 0.01}))
    model = HirlModel.from_config(cfg)
    method = model.method
    views = ViewDataset(build_dataset(cfg.data, "train"), method.transform(cfg.data))
    loader = DataLoader(views, batch_size=8, shuffle=True, drop_last=True)
    batch_views, _ = next(iter(loader))
    assert [tuple(v.shape[-2:]) for v in batch_views] == [(32, 32), (32, 32), (12, 12)]

    passes: list[tuple[int, ...]] = []
    method.backbone.register_forward_hook(lambda m, i, o: passes.append(tuple(i[0].shape)))
    optimizer = build_optimizer(model.param_groups(), cfg.train)
    # Method groups (decay, no-decay, projector) + the HIRL heads' group reach the optimiser.
    assert len(optimizer.param_groups) == 4
    decay, no_decay, projector, heads = optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    assert all(p.ndim <= 1 for p in no_decay["params"])
    assert {id(p) for p in projector["params"]} == {id(p) for p in method.projector.parameters()}
    assert {id(p) for p in heads["params"]} == {id(p) for p in model.heads.parameters()}
    before = [p.detach().clone() for p in method.projector.parameters()]

    stats, step = train_epoch(model, loader, optimizer, epoch=3, step=10, total_steps=100,
                              base_lr=0.1, warmup_steps=0, hierarchy=StaticHierarchy(None),
                              device=torch.device("cpu"), max_steps=2)
    assert step == 12 and stats.steps == 2 and torch.isfinite(torch.tensor(stats.loss))
    assert method.hook_calls == [(10, 3), (11, 3)]  # after every backward, with step/epoch
    assert len(passes) == 4 and passes[0][-1] == 32 and passes[1][-1] == 12  # 2 per step
    assert passes[0][0] == 16  # the two global views in one pass
    assert projector["lr"] == pytest.approx(2 * decay["lr"]) and decay["lr"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, method.projector.parameters(),
                                                     strict=True))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_toy_method_trains_through_fit_on_ray(tmp_path) -> None:
    import hirl_ray

    # One worker, HIRL from the first step (no warm-up, synchronous first build), so the
    # method's views, groups and the path loss all run in the Ray worker.
    overrides = tiny_config(tmp_path, **{
        "method.name": NAME, "method.local_size": 16, "train.num_workers": 1,
        "train.epochs": 2, "hirl.warmup_epochs": 0, "hirl.async_rebuild": False})
    result = hirl_ray.fit(None, overrides)
    metrics = result.metrics
    assert metrics["train/hirl_active"] is True
    assert metrics["train/semantic_loss"] == metrics["train/semantic_loss"]  # not NaN
    assert 0.0 <= metrics["knn_acc/superclass"] <= 1.0  # the final evaluation parsed it too
    assert read_meta(result.checkpoint_path).config["method"]["local_size"] == 16
