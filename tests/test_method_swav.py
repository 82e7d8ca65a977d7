"""SwAV: Sinkhorn-Knopp codes (one rank and a fake two-rank all-reduce), the swapped-prediction
loss against a direct reading of the paper, the method's loss, prototype normalisation and
freezing, the queue, the views, and the configs. 1-vs-2 workers: tests/test_distributed.py."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hirl_ray.config import ConfigError, ModelConfig, load_config
from hirl_ray.losses import sinkhorn, swav_loss
from hirl_ray.methods import HirlModel, SwAV, SwAVConfig
from hirl_ray.models import build_backbone

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
B, K, SIZE = 8, 6, 16


def make_swav(**kw) -> SwAV:
    torch.manual_seed(0)
    cfg = SwAVConfig(**{"proj_dim": 16, "hidden_dim": 32, "num_prototypes": K,
                        "num_local_crops": 0, "freeze_prototypes_steps": 0, **kw})
    backbone, feat_dim = build_backbone(ModelConfig(backbone="small_cnn", width=8), SIZE)
    return SwAV(backbone, feat_dim, cfg)


def views(n: int = B, locals_: int = 0, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.rand(n, 3, SIZE, SIZE, generator=g) for _ in range(2)]
            + [torch.rand(n, 3, 8, 8, generator=g) for _ in range(locals_)])


def cosines(n: int, k: int = K, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    c = F.normalize(torch.randn(k, 16, generator=g), dim=1)
    return z @ c.T


# ---- Sinkhorn -----------------------------------------------------------------------------

def test_sinkhorn_rows_are_codes_and_columns_share_the_batch_equally() -> None:
    s = cosines(40)
    q = sinkhorn(s, 0.05, 3)
    assert q.shape == (40, K) and not q.requires_grad
    torch.testing.assert_close(q.sum(1), torch.ones(40))  # each sample's code sums to 1
    q_many = sinkhorn(s, 0.05, 200)
    torch.testing.assert_close(q_many.sum(0), torch.full((K,), 40 / K), rtol=1e-3, atol=1e-3)
    # 3 iterations already pull the prototype marginals toward B/K from the softmax's.
    soft = F.softmax(s / 0.05, dim=1).sum(0)
    assert (q.sum(0) - 40 / K).abs().max() < 0.6 * (soft - 40 / K).abs().max()
    # The solution has the form Diag(u) exp(S/ε) Diag(v) (SwAV Eq. 3): a rank-1 ratio.
    ratio = q_many.double() / torch.exp(s.double() / 0.05)
    outer = ratio[:, :1] * ratio[:1, :] / ratio[0, 0]
    torch.testing.assert_close(ratio, outer, rtol=1e-4, atol=0)


class FakeRanks:
    """A sum over ``n`` threads, each one "rank" (a barrier makes every call collective)."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * n

    def all_reduce(self, rank: int):
        def reduce(x: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = x.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()  # nobody overwrites a slot before everyone has summed
            return total
        return reduce


def test_sinkhorn_over_two_fake_ranks_equals_one_rank_on_the_concatenated_batch() -> None:
    s = cosines(2 * B, seed=3)
    one = sinkhorn(s, 0.05, 3)
    ranks = FakeRanks(2)
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda r: sinkhorn(s[r * B:(r + 1) * B], 0.05, 3,
                                                 ranks.all_reduce(r)), range(2)))
    torch.testing.assert_close(torch.cat(parts), one, rtol=1e-5, atol=1e-7)
    # Without the cross-rank sums each half is balanced on its own: different codes.
    alone = torch.cat([sinkhorn(s[:B], 0.05, 3), sinkhorn(s[B:], 0.05, 3)])
    assert (alone - one).abs().max() > 1e-3


# ---- the swapped-prediction loss ----------------------------------------------------------

def paper_loss(scores, codes, tau) -> float:
    """SwAV Eq. 1–2 / multi-crop Sec. 3.2, element by element in float64: the code of each
    global crop t is predicted from every other crop s; averaged over crops and samples."""
    total = 0.0
    for t, q in enumerate(codes):
        others = [s for s in range(len(scores)) if s != t]
        for s in others:
            for b in range(q.shape[0]):
                row = [float(x) / tau for x in scores[s][b]]
                log_norm = math.log(sum(math.exp(x) for x in row))
                total -= sum(float(q[b, k]) * (row[k] - log_norm) for k in range(len(row))) \
                    / (q.shape[0] * len(others) * len(codes))
    return total


def test_swav_loss_equals_the_paper_on_random_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(5, K, generator=g) for _ in range(4)]  # 2 global + 2 local crops
    codes = [F.softmax(torch.randn(5, K, generator=g), dim=1) for _ in range(2)]
    got = swav_loss(scores, codes, 0.1)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), paper_loss(scores, codes, 0.1), rel_tol=1e-5)
    # Swapping the codes' crops changes it (the prediction is crossed, not same-crop).
    assert not math.isclose(swav_loss(scores, codes[::-1], 0.1).item(), got.item(), rel_tol=1e-3)
    with pytest.raises(ValueError, match="needs >= 2 crops"):
        swav_loss(scores[:1], codes[:1], 0.1)


def test_method_loss_replays_from_its_heads_with_local_crops() -> None:
    m = make_swav(num_local_crops=2).eval()  # eval: per-sample BN, one rank
    v = views(locals_=2)
    with torch.no_grad():
        out = m(v)
        scores = [m.prototypes(F.normalize(m.projector(m.backbone(x)), dim=1)) for x in v]
        codes = [sinkhorn(s, 0.05, 3) for s in scores[:2]]
    assert math.isclose(out.loss.item(), paper_loss(scores, codes, 0.1), rel_tol=1e-4)
    with pytest.raises(ValueError, match="expects 4 views per image, got 2"):
        m(v[:2])


def test_prototypes_are_normalised_before_each_training_forward() -> None:
    m = make_swav()
    assert (m.prototypes.weight.norm(dim=1) - 1).abs().max() > 0.1  # nn.Linear init
    m.eval()(views())
    assert (m.prototypes.weight.norm(dim=1) - 1).abs().max() > 0.1  # not in evaluation
    m.train()(views())
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(K))


def test_prototypes_are_frozen_for_the_first_steps_then_move() -> None:
    from hirl_ray.config import TrainConfig
    from hirl_ray.train.loop import StaticHierarchy, train_epoch
    from hirl_ray.train.optim import build_optimizer

    m = make_swav(freeze_prototypes_steps=3)
    model = HirlModel(m, 0)
    opt = build_optimizer(model.param_groups(), TrainConfig(lr=0.5, weight_decay=0.1))
    batch = [(views(seed=i), torch.arange(B)) for i in range(3)]
    start = F.normalize(m.prototypes.weight.detach().clone(), dim=1)
    backbone = [p.detach().clone() for p in m.backbone.parameters()]

    def run(step: int, batches) -> int:
        return train_epoch(model, batches, opt, epoch=0, step=step, total_steps=100, base_lr=0.5,
                           warmup_steps=0, hierarchy=StaticHierarchy(None),
                           device=torch.device("cpu"))[1]

    step = run(0, batch)  # steps 0, 1, 2: frozen (no gradient step, no weight decay)
    assert step == 3
    torch.testing.assert_close(m.prototypes.weight, start, rtol=0, atol=1e-6)
    moved = zip(backbone, m.backbone.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in moved)
    run(step, batch[:2])  # steps 3, 4: they learn
    assert (m.prototypes.weight - start).abs().max() > 1e-3


# ---- queue --------------------------------------------------------------------------------

def test_queue_fills_from_its_start_epoch_and_is_used_once_full() -> None:
    m = make_swav(queue_length=2 * B, queue_start_epochs=1)
    v = [views(seed=i) for i in range(4)]

    def embed(x):  # normalised embeddings of both global crops (train mode, as forward)
        with torch.no_grad():
            return F.normalize(m.projector(m.backbone(torch.cat(x))), dim=1).view(2, B, -1)

    m.on_step_start(0, 0, 0.0)
    m(v[0])
    assert not m.queue.any()  # epoch 0 < queue_start_epochs
    m.on_step_start(1, 1, 0.1)
    m(v[1])
    torch.testing.assert_close(m.queue[:, :B], embed(v[1]))
    assert not m.queue[:, B:].any()
    m(v[2])  # not full before this step: no queue in its codes; now full, newest first
    torch.testing.assert_close(m.queue, torch.cat([embed(v[2]), embed(v[1])], dim=1))
    queue = m.queue.clone()

    out = m(v[3])  # full: the stored rows join the Sinkhorn, only the batch's codes are used
    with torch.no_grad():
        z = embed(v[3])
        scores = [m.prototypes(z[c]) for c in range(2)]
        codes = [sinkhorn(torch.cat([m.prototypes(queue[c]), scores[c]]), 0.05, 3)[-B:]
                 for c in range(2)]
        plain = [sinkhorn(s, 0.05, 3) for s in scores]
    torch.testing.assert_close(out.loss, swav_loss(scores, codes, 0.1))
    assert not torch.allclose(out.loss, swav_loss(scores, plain, 0.1))
    torch.testing.assert_close(m.queue, torch.cat([z, queue[:, :B]], dim=1))
    m.eval()(v[0])  # evaluation neither uses nor fills the queue
    torch.testing.assert_close(m.queue, torch.cat([z, queue[:, :B]], dim=1))
    assert "queue" in m.state_dict() and "queue" not in make_swav().state_dict()


# ---- views and configs --------------------------------------------------------------------

def test_views_are_two_global_and_the_local_crops_of_the_config() -> None:
    cfg = load_config(ROOT / "experiments" / "small" / "swav.yaml")
    m = SwAV(*build_backbone(cfg.model, 32), cfg.method)
    tf = m.transform(cfg.data)
    out = tf((torch.rand(3, 40, 40) * 255).byte())
    assert [tuple(x.shape) for x in out] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert tf.transforms[0].transforms[0].scale == (0.14, 1.0)
    assert tf.transforms[2].transforms[0].scale == (0.05, 0.14)


def test_paper_config_has_the_official_hirl_swav_settings() -> None:
    cfg = load_config(ROOT / "experiments" / "paper" / "hirl_swav_resnet50.yaml")
    m = cfg.method
    assert (m.num_prototypes, m.proj_dim, m.hidden_dim, m.temperature, m.epsilon,
            m.sinkhorn_iters) == (3000, 128, 2048, 0.1, 0.05, 3)
    assert (m.num_local_crops, m.crop_sizes, m.min_scale_crops, m.max_scale_crops) == \
        (6, (224, 96), (0.14, 0.05), (1.0, 0.14))
    assert m.queue_length == 0 and m.freeze_prototypes_steps == 313
    t = cfg.train
    assert (t.batch_size, t.lr, t.min_lr, t.warmup_lr_epochs, t.weight_decay, t.optimizer) == \
        (4096, 4.8, 0.0048, 10, 1e-6, "lars")
    assert cfg.model.sync_bn and cfg.hirl.iter_wise_assignment
    assert SwAVConfig() == m  # the defaults are the paper's


@pytest.mark.parametrize(("overrides", "match"), [
    ({"method.crop_sizes": [24, 16]}, r"method\.crop_sizes\[0\] \(24\) must equal data\.image"),
    ({"method.queue_length": 100}, r"method\.queue_length \(100\) must be a multiple of train"),
    ({"method.crop_sizes": [32]}, r"method\.crop_sizes must be \[global, local\]"),
    ({"method.min_scale_crops": [0.5, 0.05], "method.max_scale_crops": [0.4, 0.14]},
     r"global crop scale needs 0 < min_scale_crops\[0\] \(0\.5\) <= max"),
    ({"method.epsilon": 0}, r"method\.epsilon must be > 0"),
    ({"model.backbone": "vit_tiny", "model.patch_size": 8, "method.crop_sizes": [32, 12]},
     r"method\.crop_sizes\[1\] \(12\) must be a multiple of the ViT patch \(8 px\)"),
])
def test_config_errors_name_the_key(overrides, match) -> None:
    base = {"method.name": "swav", "method.crop_sizes": [32, 16], "train.batch_size": 64}
    with pytest.raises(ConfigError, match=match):
        load_config(None, {**base, **overrides})
    assert load_config(None, {**base, "method.queue_length": 128}).method.queue_length == 128


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_swav_with_hirl_fits_through_ray(tmp_path) -> None:
    import hirl_ray
    from hirl_ray.train.checkpoint import find_checkpoints, read_meta

    from .conftest import tiny_config

    # Synchronous first build after the 1-epoch warm-up, so epoch 2 runs HIRL however slow
    # k-means is here; iter_wise_assignment as the official HIRL-SwAV config.
    result = hirl_ray.fit(None, tiny_config(tmp_path, **{
        "method.name": "swav", "method.num_prototypes": 20, "method.num_local_crops": 2,
        "method.crop_sizes": [32, 16], "method.freeze_prototypes_steps": 2,
        "train.epochs": 2, "train.num_workers": 1, "data.train_per_class": 4,
        "hirl.async_rebuild": False, "hirl.iter_wise_assignment": True}))
    metas = [read_meta(p) for p in find_checkpoints(Path(result.run_dir))]
    assert [m.epoch for m in metas] == [1, 2]
    assert metas[-1].hierarchy_version >= 1 and metas[-1].metrics["hirl_active"]
    assert all(math.isfinite(m.metrics["loss"]) for m in metas)
    assert math.isfinite(result.metrics["train/semantic_loss"])
