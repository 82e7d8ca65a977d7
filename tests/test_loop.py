"""Framework-free loop pieces: schedules, rebuild timing, checkpoints."""

from __future__ import annotations

import dataclasses

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
from hirl_ray.train.loop import cosine_lr, is_rebuild_epoch


def test_cosine_lr_warmup_then_decay_to_zero():
    assert cosine_lr(1.0, 0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr(1.0, 9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(1.0, 10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(1.0, 100, 100) == pytest.approx(0.0, abs=1e-12)
    values = [cosine_lr(1.0, s, 100) for s in range(100)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


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
