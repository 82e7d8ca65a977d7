"""Non-finite steps (train.on_nan, train.max_nan_skips) and gradient clipping (train.grad_clip)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hirl_ray.config import ConfigError, RunStopped, load_config
from hirl_ray.methods.hirl import HirlModel
from hirl_ray.train.loop import StaticHierarchy, train_epoch
from hirl_ray.train.numerics import NanGuard, NonFiniteError
from hirl_ray.train.optim import build_optimizer

CPU = torch.device("cpu")


def _moco(optimizer: str = "sgd"):
    """A tiny MoCo v2 (key encoder EMA, queue, BatchNorm: everything a step may change)."""
    torch.manual_seed(0)
    cfg = load_config(None, {"model.width": 8, "method.name": "mocov2", "method.hidden_dim": 16,
                             "method.proj_dim": 8, "method.queue_size": 32,
                             "hirl.enabled": False, "train.optimizer": optimizer})
    model = HirlModel.from_config(cfg)
    return cfg, model, build_optimizer(model.param_groups(), cfg.train)


def _batch(seed: int, nan: bool = False):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    if nan:
        views[0][1, 0, 3, 3] = float("nan")
    return views, torch.arange(4)


def _run(model, opt, batches, guard, *, epoch=0, step=0):
    return train_epoch(model, batches, opt, epoch=epoch, step=step, total_steps=100,
                       base_lr=0.1, warmup_steps=0, hierarchy=StaticHierarchy(None),
                       device=CPU, guard=guard)


def _state(model, opt) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, st in enumerate(opt.state.values()):
        out.update({f"opt.{i}.{k}": v.detach().clone() for k, v in st.items()
                    if isinstance(v, torch.Tensor)})
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_raises_naming_the_epoch_and_step_and_keeps_the_last_checkpoint():
    _, model, opt = _moco()
    guard = NanGuard(model, opt, CPU)  # train.on_nan=stop, the default
    batches = [_batch(0), _batch(1), _batch(2, nan=True), _batch(3)]
    with pytest.raises(NonFiniteError, match=r"epoch 4, step 32 \(train.on_nan=stop\); no "
                       r"checkpoint is written for epoch 4; the last good checkpoint \(epoch 3\)"):
        _run(model, opt, batches, guard, epoch=3, step=30)
    # The default guard of train_epoch stops too, at the first epoch without a checkpoint.
    _, model, opt = _moco()
    with pytest.raises(NonFiniteError, match="epoch 1, step 0 .*no checkpoint was written yet"):
        train_epoch(model, [_batch(0, nan=True)], opt, epoch=0, step=0, total_steps=10,
                    base_lr=0.1, warmup_steps=0, hierarchy=StaticHierarchy(None), device=CPU)


def test_stop_is_read_on_the_host_every_check_every_steps():
    _, model, opt = _moco()
    reached = []
    batches = [_batch(0, nan=True), *(_batch(i) for i in range(1, 6))]

    def counted():
        for b in batches:
            reached.append(1)
            yield b

    with pytest.raises(NonFiniteError, match="step 0"):
        _run(model, opt, counted(), NanGuard(model, opt, CPU, check_every=3))
    assert len(reached) == 3  # raised at the first read (after 3 steps), not at the epoch end


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "lars"])
def test_skip_step_changes_nothing_and_training_goes_on(optimizer):
    _, model, opt = _moco(optimizer)
    guard = NanGuard(model, opt, CPU, policy="skip_step")
    stats, step = _run(model, opt, [_batch(0), _batch(1)], guard)
    before = _state(model, opt)
    stats, step = _run(model, opt, [_batch(2, nan=True)], guard, epoch=1, step=step)
    assert stats.nan_skipped == 1 and step == 3
    assert _same(before, _state(model, opt))  # params, key encoder, queue, BN stats, optimiser
    stats, _ = _run(model, opt, [_batch(3), _batch(4, nan=True), _batch(5)], guard, epoch=2,
                    step=step)
    assert stats.nan_skipped == 1 and stats.steps == 3
    assert not _same(before, _state(model, opt))  # the good steps trained
    assert all(torch.isfinite(v).all() for v in _state(model, opt).values()
               if v.is_floating_point())
    assert torch.isfinite(torch.tensor(stats.loss))  # the skipped step is not averaged in


def test_a_skipped_first_step_leaves_the_optimiser_as_if_it_never_ran():
    # The optimiser's state is made at its first step; undone, the next step must start it
    # afresh: bad-then-good equals good alone (same global step for the schedules).
    _, model, opt = _moco()
    guard = NanGuard(model, opt, CPU, policy="skip_step")
    _run(model, opt, [_batch(0, nan=True), _batch(1)], guard)
    _, ref_model, ref_opt = _moco()
    _run(ref_model, ref_opt, [_batch(1)], NanGuard(ref_model, ref_opt, CPU), step=1)
    assert _same(_state(ref_model, ref_opt), _state(model, opt))


def test_skip_step_stops_after_max_nan_skips_in_a_row():
    _, model, opt = _moco()
    guard = NanGuard(model, opt, CPU, policy="skip_step", max_skips=3)
    alternating = [_batch(i, nan=i % 2 == 0) for i in range(8)]
    stats, step = _run(model, opt, alternating, guard)
    assert stats.nan_skipped == 4  # never 3 in a row: counted, not stopped
    # 2 bad steps end this epoch; the run carries over into the next one.
    _run(model, opt, [_batch(10), _batch(11, nan=True), _batch(12, nan=True)], guard, epoch=1,
         step=step)
    with pytest.raises(NonFiniteError, match=r"3 non-finite steps in a row up to epoch 3, "
                       r"step 11 \(train.max_nan_skips=3\)"):
        _run(model, opt, [_batch(13, nan=True), _batch(14)], guard, epoch=2, step=step + 3)


def test_grad_clip_bounds_the_norm_the_hook_sees(monkeypatch):
    norms = {}
    for clip in (None, 0.05):
        _, model, opt = _moco()
        seen = []

        def hook(step, epoch, model=model, seen=seen):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))))

        monkeypatch.setattr(model.method, "after_backward", hook)
        _run(model, opt, [_batch(0), _batch(1)], NanGuard(model, opt, CPU, grad_clip=clip))
        norms[clip] = seen
    assert min(norms[None]) > 0.5  # unclipped norms are far above the bound ...
    assert max(norms[0.05]) <= 0.05 * (1 + 1e-4)  # ... and clipped ones are within it


def test_guard_counts_without_a_host_read_per_step(monkeypatch):
    _, model, opt = _moco()
    guard = NanGuard(model, opt, CPU, policy="skip_step", grad_clip=1.0)

    def reads(steps: int) -> int:
        count = 0

        def counting(name):
            original = getattr(torch.Tensor, name)

            def wrapper(self, *args, **kwargs):
                nonlocal count
                count += 1
                return original(self, *args, **kwargs)

            return wrapper

        batches = [_batch(i, nan=i == 1) for i in range(steps)]
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
                m.setattr(torch.Tensor, name, counting(name))
            _run(model, opt, batches, guard)
        return count

    assert reads(2) == reads(6)


def test_config_keys_are_checked():
    cfg = load_config(None)
    assert (cfg.train.on_nan, cfg.train.max_nan_skips, cfg.train.grad_clip) == ("stop", 10, None)
    with pytest.raises(ConfigError, match="train.on_nan must be one of stop, skip_step"):
        load_config(None, {"train.on_nan": "ignore"})
    with pytest.raises(ConfigError, match=r"train.max_nan_skips must be > 0"):
        load_config(None, {"train.max_nan_skips": 0})
    with pytest.raises(ConfigError, match="train.grad_clip must be a positive"):
        load_config(None, {"train.grad_clip": 0})
    assert load_config(None, {"train.grad_clip": 1}).train.grad_clip == 1.0


def test_build_parts_wires_the_guard_from_the_config():
    from hirl_ray.train.steps import build_parts

    cfg = load_config(None, {"model.width": 8, "method.hidden_dim": 16, "method.proj_dim": 8,
                             "train.on_nan": "skip_step", "train.max_nan_skips": 4,
                             "train.grad_clip": 2.5, "hirl.enabled": False})
    run = build_parts(cfg, 0, 1, CPU)
    g = run.guard
    assert (g.policy, g.max_skips, g.grad_clip, g.model, g.optimizer) == (
        "skip_step", 4, 2.5, run.model, run.optimizer)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, on_nan="stop"))
    assert build_parts(cfg, 0, 1, CPU).guard.policy == "stop"


def test_a_stop_raised_in_a_worker_shows_as_one_line():
    from hirl_ray.data.folder import BadImageFile

    # How a DataLoader worker process re-raises it: the traceback is in the message.
    wrapped = BadImageFile("Caught BadImageFile in DataLoader worker process 0.\nOriginal "
                           "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                           "hirl_ray.data.folder.BadImageFile: cannot read image /d/a.jpg (x)")
    assert wrapped.summary == "cannot read image /d/a.jpg (x)"
    assert isinstance(wrapped, RunStopped)
    assert NonFiniteError("one line").summary == "one line"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_on_cuda_with_amp_a_skipped_step_changes_nothing(amp_dtype):
    # AMP: the GradScaler skips the optimiser step on NaN gradients; the guard flags the NaN
    # loss and undoes the rest (queue, key encoder, BN statistics). AdamW keeps its step count
    # on the GPU (capturable), so nothing here needs a host read per step.
    cuda = torch.device("cuda")
    cfg, model, _ = _moco("adamw")
    model = model.to(cuda)
    opt = build_optimizer(model.param_groups(), cfg.train, capturable=True)
    guard = NanGuard(model, opt, cuda, policy="skip_step")
    # float16 scales the loss; bfloat16 (train.amp_dtype) needs no scaler.
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == "float16" else None

    def run(batches, step):
        batches = [([v.to(cuda) for v in views], i.to(cuda)) for views, i in batches]
        return train_epoch(model, batches, opt, epoch=0, step=step, total_steps=100,
                           base_lr=0.1, warmup_steps=0, hierarchy=StaticHierarchy(None),
                           device=cuda, scaler=scaler, amp_dtype=getattr(torch, amp_dtype),
                           guard=guard)

    _, step = run([_batch(0), _batch(1)], 0)
    before = _state(model, opt)
    stats, _ = run([_batch(2, nan=True)], step)
    assert stats.nan_skipped == 1
    assert _same(before, _state(model, opt))


def test_amp_dtype_is_checked_and_bfloat16_builds_no_scaler():
    with pytest.raises(ConfigError, match="train.amp_dtype must be one of float16, bfloat16"):
        load_config(None, {"train.amp_dtype": "fp8"})
    from hirl_ray.train.steps import build_parts

    run = build_parts(load_config(None, {"train.amp_dtype": "bfloat16"}), 0, 1,
                      torch.device("cpu"))
    assert run.scaler is None and run.amp_dtype is None  # mixed precision is CUDA-only
