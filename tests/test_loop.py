"""Framework-free loop pieces: schedules, rebuild timing, checkpoints."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hirl_ray.config import load_config
from hirl_ray.train.checkpoint import (
    CheckpointMeta,
    find_checkpoints,
    latest_checkpoint,
    load_state,
    read_meta,
    save_checkpoint,
)
from hirl_ray.train.loop import is_rebuild_epoch


def test_rebuild_schedule_follows_warmup_and_interval():
    hirl = load_config(None, {"hirl.warmup_epochs": 2, "hirl.rebuild_every_epochs": 3,
                              "train.epochs": 12}).hirl
    due = [e for e in range(13) if is_rebuild_epoch(e, hirl, 12)]
    assert due == [2, 5, 8, 11]
    no_warmup = load_config(None, {"hirl.warmup_epochs": 0, "train.epochs": 4,
                                   "hirl.rebuild_every_epochs": 2}).hirl
    assert [e for e in range(5) if is_rebuild_epoch(e, no_warmup, 4)] == [0, 2]
    off = load_config(None, {"hirl.enabled": False}).hirl
    assert not any(is_rebuild_epoch(e, off, 10) for e in range(10))


def _meta(epoch: int) -> CheckpointMeta:
    return CheckpointMeta(epoch=epoch, step=epoch * 10, hierarchy_version=epoch // 2,
                          config=load_config(None).to_dict(), metrics={"loss": 1.0 / epoch})


def test_checkpoint_round_trip_and_latest(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    for epoch in (1, 2, 10):
        save_checkpoint(tmp_path / "train" / f"epoch_{epoch:04d}", model_state=model.state_dict(),
                        optimizer_state=opt.state_dict(), scaler_state=None, meta=_meta(epoch))
    # A half-written checkpoint (no meta.json) is never picked.
    (tmp_path / "train" / "epoch_0011").mkdir()
    (tmp_path / "train" / "epoch_0011" / "state.pt.tmp").write_bytes(b"partial")
    assert [read_meta(p).epoch for p in find_checkpoints(tmp_path)] == [1, 2, 10]
    last = latest_checkpoint(tmp_path)
    assert last is not None and last.endswith("epoch_0010")
    meta = read_meta(last)
    assert (meta.epoch, meta.step, meta.hierarchy_version) == (10, 100, 5)
    state = load_state(last)
    restored = torch.nn.Linear(4, 2)
    restored.load_state_dict(state["model"])
    assert torch.equal(restored.weight, model.weight)
    assert state["optimizer"]["state"][0]["momentum_buffer"].shape == (2, 4)


def test_missing_checkpoint_error_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a hirl_ray checkpoint"):
        read_meta(tmp_path)
    assert latest_checkpoint(tmp_path) is None


def _count_host_reads(monkeypatch, steps: int) -> int:
    """Python-level reads of tensor values (item/tolist/float/int/bool) during ``steps`` steps."""
    from torch import nn

    from hirl_ray.hierarchy import fit_hierarchy
    from hirl_ray.methods.hirl import HirlModel
    from hirl_ray.train.loop import StaticHierarchy, train_epoch
    from hirl_ray.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = load_config(None, {"model.width": 8, "method.hidden_dim": 32, "method.proj_dim": 16,
                             "hirl.num_clusters": [6, 2], "hirl.num_neg_paths": 4})
    model = HirlModel.from_config(cfg)
    dim = [m for m in model.heads[0].modules() if isinstance(m, nn.Linear)][-1].out_features
    h = fit_hierarchy(torch.randn(40, dim), [6, 2], nredo=1, niter=5)
    batches = [([torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)], torch.arange(8) + 8 * i)
               for i in range(steps)]
    opt = build_optimizer(model.param_groups(), dataclasses.replace(cfg.train, lr=0.01))
    reads = 0

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            nonlocal reads
            reads += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    train_epoch(model, batches, opt, epoch=0, step=0, total_steps=steps, base_lr=0.01,
                warmup_steps=0, hierarchy=StaticHierarchy(h), device=torch.device("cpu"))
    monkeypatch.undo()
    return reads


def test_train_epoch_reads_losses_from_the_device_once_per_epoch(monkeypatch):
    # A per-step float(loss) blocks the host until a GPU step finishes (no overlap): the number of
    # host reads must not grow with the number of steps.
    assert _count_host_reads(monkeypatch, 2) == _count_host_reads(monkeypatch, 5)


def test_hierarchy_is_polled_on_the_same_global_steps_every_poll_every(monkeypatch):
    from hirl_ray.methods.hirl import HirlModel
    from hirl_ray.train.loop import train_epoch
    from hirl_ray.train.optim import build_optimizer

    class Counting:
        current = None

        def __init__(self):
            self.steps: list[int] = []

        def poll(self):
            self.steps.append(len(seen))

    seen: list[int] = []
    cfg = load_config(None, {"model.width": 8, "method.hidden_dim": 16, "method.proj_dim": 8,
                             "hirl.enabled": False})
    model = HirlModel.from_config(cfg)
    batches = [([torch.randn(4, 3, 32, 32)] * 2, torch.arange(4)) for _ in range(7)]
    original = model.forward

    def forward(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    source = Counting()
    opt = build_optimizer(model.param_groups(), dataclasses.replace(cfg.train, lr=0.01))
    train_epoch(model, batches, opt, epoch=1,
                step=6, total_steps=20, base_lr=0.01, warmup_steps=0, hierarchy=source,
                device=torch.device("cpu"), poll_every=4)
    # Global steps 6..12: polled before the steps 8 and 12 (the 3rd and 7th of this epoch).
    assert source.steps == [2, 6]


# ---- optimisers from parameter groups (train/optim.py) ------------------------------------

def _lars_by_hand(w, grads, lr, wd, eta, momentum=0.9):
    """LARS (You et al. 2017) written out per step: trust, update, momentum buffer."""
    w, v = w.clone(), None
    for g in grads:
        trust = eta * w.norm() / (g.norm() + wd * w.norm())
        u = trust * (g + wd * w)
        v = u if v is None else momentum * v + u
        w = w - lr * v
    return w


def test_lars_steps_equal_the_formula_per_parameter():
    from hirl_ray.train.optim import LARS

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(w.shape, generator=g) for w in weights] for _ in range(3)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = LARS([{"params": params}], lr=2.0, weight_decay=0.1, eta=0.02)
    for step_grads in grads:
        for p, gr in zip(params, step_grads, strict=True):
            p.grad = gr.clone()
        opt.step()
    for i, (p, w) in enumerate(zip(params, weights, strict=True)):
        expected = _lars_by_hand(w, [s[i] for s in grads], lr=2.0, wd=0.1, eta=0.02)
        torch.testing.assert_close(p.detach(), expected)
        assert not torch.allclose(p.detach(), w)
    # One hand-checked number: w = (3, 4), g = (0.6, 0.8): trust = 1e-3*5/(1 + 0.1*5).
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([0.6, 0.8])
    LARS([p], lr=1.0, weight_decay=0.1, eta=1e-3).step()
    trust = 1e-3 * 5 / 1.5
    torch.testing.assert_close(p.detach(), torch.tensor([3 - trust * 0.9, 4 - trust * 1.2]))


def test_lars_excluded_group_is_plain_sgd_with_momentum_and_no_weight_decay():
    from hirl_ray.train.optim import LARS

    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, generator=g)
    grads = [torch.randn(6, generator=g) for _ in range(4)]
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    lars = LARS([{"params": [a], "lars_exclude": True}], lr=0.3, weight_decay=0.5)
    sgd = torch.optim.SGD([b], lr=0.3, momentum=0.9)
    for gr in grads:
        a.grad, b.grad = gr.clone(), gr.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(a.detach(), b.detach())


def test_build_optimizer_runs_the_configured_optimizer_over_the_groups():
    from hirl_ray.config import TrainConfig
    from hirl_ray.methods import split_weight_decay
    from hirl_ray.train.optim import LARS, build_optimizer

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    groups = split_weight_decay(net.named_parameters())
    kinds = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "lars": LARS}
    for name, cls in kinds.items():
        opt = build_optimizer(groups, TrainConfig(optimizer=name, lr=0.2, weight_decay=0.01))
        assert type(opt) is cls, name
        decay, no_decay = opt.param_groups
        assert [p.shape for p in decay["params"]] == [(3, 4)]  # the Linear weight only
        assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
        assert no_decay["lars_exclude"] and len(no_decay["params"]) == 3  # bias, BN w and b
    assert len(groups[0]) == 1  # the caller's groups were not modified
    restored = build_optimizer(split_weight_decay(net.named_parameters()), TrainConfig())
    restored.load_state_dict(opt.state_dict())  # checkpoints keep the group keys
    assert restored.param_groups[1]["lars_exclude"] and restored.param_groups[0]["lr"] == 0.2


def test_apply_schedule_scales_fixes_and_decays_per_group():
    from hirl_ray.config import TrainConfig
    from hirl_ray.train.optim import apply_schedule, build_optimizer

    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in range(4)]
    opt = build_optimizer([{"params": [ps[0]]}, {"params": [ps[1]], "lr_scale": 0.5},
                           {"params": [ps[2]], "fixed_lr": True},
                           {"params": [ps[3]], "weight_decay": 0.0}],
                          TrainConfig(lr=1.0, weight_decay=0.1))
    apply_schedule(opt, lr=0.4, base_lr=1.0, weight_decay=0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.4, 0.2, 1.0, 0.4]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.3, 0.3, 0.0]
    apply_schedule(opt, lr=0.1, base_lr=1.0)  # no weight decay schedule: left as it is
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.3, 0.3, 0.0]


def _tiny_model_and_batches(steps: int = 3):
    from hirl_ray.methods.hirl import HirlModel

    torch.manual_seed(0)
    cfg = load_config(None, {"model.width": 8, "method.hidden_dim": 16, "method.proj_dim": 8,
                             "hirl.enabled": False, "train.weight_decay": 0.1,
                             "train.weight_decay_end": 0.5})
    batches = [([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)], torch.arange(4))
               for _ in range(steps)]
    return cfg, HirlModel.from_config(cfg), batches


def test_train_epoch_follows_the_weight_decay_schedule():
    from hirl_ray.train.loop import StaticHierarchy, train_epoch
    from hirl_ray.train.optim import build_optimizer

    cfg, model, batches = _tiny_model_and_batches()
    opt = build_optimizer(model.param_groups(), cfg.train)
    seen = []
    original = opt.step

    def step(*args, **kwargs):
        seen.append(opt.param_groups[0]["weight_decay"])
        return original(*args, **kwargs)

    opt.step = step
    train_epoch(model, batches, opt, epoch=0, step=5, total_steps=10, base_lr=0.1,
                warmup_steps=0, hierarchy=StaticHierarchy(None), device=torch.device("cpu"),
                weight_decay=(cfg.train.weight_decay, cfg.train.weight_decay_end))
    assert seen == pytest.approx([0.3, 0.3 + 0.2 * math.sin(math.pi * 0.1),
                                  0.3 + 0.2 * math.sin(math.pi * 0.2)])


def test_after_backward_sees_the_gradients_before_the_optimiser_step(monkeypatch):
    from hirl_ray.train.loop import StaticHierarchy, train_epoch
    from hirl_ray.train.optim import build_optimizer

    cfg, model, batches = _tiny_model_and_batches(2)
    opt = build_optimizer(model.param_groups(), dataclasses.replace(cfg.train, weight_decay=0.0))
    calls = []

    def freeze(step: int, epoch: int) -> None:  # e.g. DINO's last-layer freeze
        calls.append((step, epoch, all(p.grad is not None for p in model.method.parameters()
                                       if p.requires_grad)))
        for p in model.method.backbone.parameters():
            p.grad = None

    monkeypatch.setattr(model.method, "after_backward", freeze)
    before = [p.detach().clone() for p in model.method.backbone.parameters()]
    train_epoch(model, batches, opt, epoch=4, step=0, total_steps=2, base_lr=0.1,
                warmup_steps=0, hierarchy=StaticHierarchy(None), device=torch.device("cpu"))
    assert calls == [(0, 4, True), (1, 4, True)]
    assert all(torch.equal(a, b) for a, b in zip(before, model.method.backbone.parameters(),
                                                 strict=True))
    assert any(p.grad is not None for p in model.method.projector.parameters())


def test_progress_line_says_warm_up_only_when_hirl_is_on():
    from hirl_ray.train.loop import EpochStats, format_epoch

    stats = EpochStats(epoch=0, loss=1.0, method_loss=1.0, semantic_loss=None, semantic_steps=0,
                       steps=1, samples=64, seconds=1.0, lr=0.1, hierarchy_version=0)
    assert "semantic —(warm-up) | hierarchy none yet" in format_epoch(stats, 10, 2, None, False)
    off = format_epoch(stats, 10, 2, None, False, hirl_enabled=False)
    assert "semantic off | hierarchy off (hirl.enabled=false)" in off and "warm-up" not in off
