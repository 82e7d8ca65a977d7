"""SSL methods and the HIRL wrapper: they learn, gradients reach every trainable parameter
(the DDP guarantee), target networks follow the EMA, the MoCo queue wraps, checkpoints restore."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from hirl_ray.config import ExperimentConfig, HirlConfig, ModelConfig, load_config
from hirl_ray.hierarchy import PrototypeHierarchy, fit_hierarchy
from hirl_ray.losses import (
    byol_loss,
    info_nce_loss,
    negative_cosine_loss,
    nt_xent_loss,
    semantic_path_loss,
)
from hirl_ray.methods import METHODS, HirlModel, SSLMethod, build_method
from hirl_ray.models import build_backbone
from hirl_ray.schedules import cosine_momentum

torch.set_num_threads(1)

WIDTH, SIZE, BATCH, N = 16, 16, 32, 64
FEAT_DIM = 4 * WIDTH
PROJ_DIM = 32  # the heads' input and the prototypes' width (hirl.embedding=projection)
LEVELS = (8, 4, 2)
#: The library's methods (a test file may register a toy one: tests/test_extend_method.py).
BUILTIN = tuple(n for n, cls in METHODS.items() if cls.__module__.startswith("hirl_ray."))
#: The two-view methods whose losses this file replays by hand; the method zoo's own files
#: (tests/test_method_<name>.py) test theirs.
CLASSIC = ("simclr", "mocov2", "simsiam", "byol")
#: Knobs that make every method tiny and quick to move (a method takes those it has).
KNOBS = {"temperature": 0.2, "momentum": 0.9, "base_momentum": 0.9, "num_prototypes": 16,
         "out_dim": 64, "patch_out_dim": 64, "bottleneck_dim": PROJ_DIM, "num_tokens": 16,
         "num_local_crops": 0, "freeze_last_layer_epochs": 0, "freeze_prototypes_steps": 0,
         "proj_layers": 2,
         # DINO/iBOT: a centre slower than the 20 steps of test_training_reduces_loss; with 0.9
         # it catches up within them and the loss of the one fixed batch rises towards ln K.
         "center_momentum": 0.99, "patch_center_momentum": 0.99}


def model_config(name: str) -> ModelConfig:
    """The test backbone: the small CNN, or a ViT (16 px, 4-px patches) for methods that mask."""
    if METHODS[name].needs_vit:
        return ModelConfig(backbone="vit_tiny", patch_size=4)
    return ModelConfig(backbone="small_cnn", width=WIDTH)


def make_method(name: str, seed: int = 0, queue_size: int = 48) -> SSLMethod:
    torch.manual_seed(seed)
    knobs = {**KNOBS, "queue_size": queue_size}
    cls = METHODS[name]
    own = {f.name for f in dataclasses.fields(cls.Config)}
    cfg = cls.Config(
        proj_dim=PROJ_DIM, hidden_dim=64, **{k: v for k, v in knobs.items() if k in own}
    )
    backbone, feat_dim = build_backbone(model_config(name), SIZE)
    return METHODS[name](backbone, feat_dim, cfg)


def make_model(name: str, hirl: bool = True, seed: int = 0, weight: float = 1.0) -> HirlModel:
    return HirlModel(make_method(name, seed), len(LEVELS) if hirl else 0, weight, num_neg_paths=20)


@pytest.fixture(scope="module")
def batch() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two fixed additive-noise views of 32 images of the built-in set (16 px), and indices."""
    from hirl_ray.config import DataConfig
    from hirl_ray.data import build_dataset
    from hirl_ray.data.transforms import eval_transform

    data = build_dataset(DataConfig(image_size=SIZE, train_per_class=2), "train")
    to_tensor = eval_transform(SIZE)
    base = torch.stack([to_tensor(data[i][0]) for i in range(BATCH)])  # 32 of its 48 images
    g = torch.Generator().manual_seed(0)
    views = [base + 0.1 * torch.randn(base.shape, generator=g) for _ in range(2)]
    return views, torch.arange(5, 5 + BATCH)  # indices into the N-sample hierarchy


@pytest.fixture(scope="module")
def hierarchy() -> PrototypeHierarchy:
    feats = F.normalize(torch.randn(N, PROJ_DIM, generator=torch.Generator().manual_seed(1)), dim=1)
    return fit_hierarchy(feats, LEVELS, seed=0, niter=10, nredo=1)


def train(model: HirlModel, views, index, h, steps: int) -> list[tuple[float, float | None]]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        out = model(views, index, h, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_target((step + 1) / steps)
        sem = None if out.semantic_loss is None else out.semantic_loss.item()
        losses.append((out.loss.item(), sem))
    return losses


@pytest.mark.parametrize("hirl", [True, False], ids=["hirl", "plain"])
@pytest.mark.parametrize("name", BUILTIN)
def test_training_reduces_loss(name: str, hirl: bool, batch, hierarchy) -> None:
    views, index = batch
    losses = train(make_model(name, hirl), views, index, hierarchy if hirl else None, steps=20)
    total = [t for t, _ in losses]
    assert all(map(lambda v: v == v and abs(v) < 1e4, total)), total
    assert sum(total[-3:]) / 3 < sum(total[:3]) / 3, total
    sems = [s for _, s in losses]
    if hirl:
        assert sems[-1] < sems[0], sems  # the HIRL heads learn the prototype paths
    else:
        assert all(s is None for s in sems)


@pytest.mark.parametrize("hirl", [True, False], ids=["hirl", "plain"])
@pytest.mark.parametrize("name", BUILTIN)
def test_every_trainable_parameter_gets_a_gradient(name: str, hirl: bool, batch, hierarchy) -> None:
    views, index = batch
    # Heads exist in both cases; without a hierarchy they must still get a (zero) gradient,
    # else DDP(find_unused_parameters=False) fails on the first backward.
    model = make_model(name, hirl=True)
    out = model(views, index, hierarchy if hirl else None)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    head_grad = sum(p.grad.abs().sum() for p in model.heads.parameters())
    assert torch.isfinite(head_grad)
    assert (head_grad > 0) if hirl else (head_grad == 0)
    assert (out.semantic_loss is not None) == hirl


@pytest.mark.parametrize(
    "name, online, target",
    [
        ("mocov2", ("backbone", "projector"), ("key_backbone", "key_projector")),
        ("byol", ("backbone", "projector"), ("target_backbone", "target_projector")),
    ],
)
def test_target_network_is_frozen_and_follows_ema(name, online, target, batch) -> None:
    method = make_method(name)
    views, _ = batch
    for o, t in zip(online, target, strict=True):
        on, tg = getattr(method, o), getattr(method, t)
        assert all(not p.requires_grad for p in tg.parameters())
        assert all(torch.equal(a, b) for a, b in zip(on.parameters(), tg.parameters(), strict=True))
        assert any(k.startswith(f"{t}.") for k in method.state_dict())
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert not any(id(p) in trainable for t in target for p in getattr(method, t).parameters())

    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method(views).loss.backward()
    opt.step()

    def gap() -> torch.Tensor:
        return torch.stack(
            [
                (a - b).norm()
                for o, t in zip(online, target, strict=True)
                for a, b in zip(
                    getattr(method, o).parameters(), getattr(method, t).parameters(), strict=True
                )
            ]
        )

    before = gap()
    assert before.max() > 0  # the step moved the online network away from the target
    progress = 0.3
    method.update_target(progress)
    m = 0.9 if name == "mocov2" else cosine_momentum(0.9, progress)
    # θ_t' − θ_o = m·(θ_t − θ_o): the target moved toward the online weights by exactly 1 − m.
    torch.testing.assert_close(gap(), m * before, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", CLASSIC)
def test_method_loss_is_the_symmetric_loss_of_its_heads(name: str, batch) -> None:
    """Replay each forward by hand (eval mode, so BN is per-sample and MoCo doesn't enqueue)."""
    views, _ = batch
    m = make_method(name).eval()
    with torch.no_grad():
        out = m(views).loss
        h = [m.backbone(v) for v in views]
        if name == "simclr":
            z = [m.projector(x) for x in h]
            expected = nt_xent_loss(z[0], z[1], 0.2)
        elif name == "mocov2":
            q = [F.normalize(m.projector(x), dim=1) for x in h]
            k = [F.normalize(m.key_projector(m.key_backbone(v)), dim=1) for v in views]
            expected = (
                info_nce_loss(q[0], k[1], m.queue, 0.2) + info_nce_loss(q[1], k[0], m.queue, 0.2)
            ) / 2
        elif name == "simsiam":
            z = [m.projector(x) for x in h]
            p = [m.predictor(x) for x in z]
            expected = (negative_cosine_loss(p[0], z[1]) + negative_cosine_loss(p[1], z[0])) / 2
        else:
            p = [m.predictor(m.projector(x)) for x in h]
            t = [m.target_projector(m.target_backbone(v)) for v in views]
            expected = byol_loss(p[0], t[1]) + byol_loss(p[1], t[0])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_moco_queue_is_a_ring_buffer(batch) -> None:
    views, _ = batch
    method = make_method("mocov2", queue_size=20)
    v = [x[:8] for x in views]  # 8 images × 2 views = 16 keys per step
    first_keys = method._keys(torch.cat(v))
    method(v)
    assert int(method.queue_ptr) == 16
    torch.testing.assert_close(method.queue[:16], first_keys)
    tail = method.queue[16:].clone()
    v2 = [x[8:16] for x in views]
    keys = method._keys(torch.cat(v2))
    method(v2)
    assert int(method.queue_ptr) == 12  # 32 mod 20: wrapped around
    torch.testing.assert_close(method.queue[16:], keys[:4])
    torch.testing.assert_close(method.queue[:12], keys[4:])
    assert not torch.equal(tail, method.queue[16:])
    # In eval mode nothing is enqueued.
    method.eval()
    snapshot = method.queue.clone()
    method(v)
    assert torch.equal(snapshot, method.queue) and int(method.queue_ptr) == 12


def test_moco_more_keys_than_slots_keeps_the_newest(batch) -> None:
    views, _ = batch
    method = make_method("mocov2", queue_size=10)
    v = [x[:8] for x in views]
    method.queue_ptr.fill_(3)
    keys = method._keys(torch.cat(v))
    method(v)
    assert int(method.queue_ptr) == 3
    torch.testing.assert_close(method.queue[3:], keys[6:13])
    torch.testing.assert_close(method.queue[:3], keys[13:])


@pytest.mark.parametrize("name", BUILTIN)
def test_embed_and_embedding_are_backbone_features(name: str, batch) -> None:
    views, index = batch
    model = make_model(name).eval()  # eval: BN running stats, so a single view gives equal output
    with torch.no_grad():
        expected = model.method.backbone(views[0])
        assert torch.equal(model.embed(views[0]), expected)
        assert torch.equal(model.method.embed(views[0]), expected)
    assert expected.shape == (BATCH, model.method.feat_dim)
    out = model.method(views)
    assert out.embedding.requires_grad
    if METHODS[name].needs_vit:  # masking methods: the [CLS] of the *masked* views[0], so
        assert out.embedding.shape == expected.shape  # tests/test_method_<name>.py checks it
        return
    torch.testing.assert_close(out.embedding, expected)


@pytest.mark.parametrize("name", BUILTIN)
def test_state_dict_round_trip_restores_targets_and_queue(name: str, batch, hierarchy) -> None:
    views, index = batch
    trained = make_model(name, seed=0)
    train(trained, views, index, hierarchy, steps=3)
    restored = make_model(name, seed=123)
    restored.load_state_dict(trained.state_dict())
    for (k, a), (_, b) in zip(
        trained.state_dict().items(), restored.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    if name == "mocov2":
        assert int(restored.method.queue_ptr) == (3 * 2 * BATCH) % 48
    trained.eval(), restored.eval()
    with torch.no_grad():
        torch.manual_seed(0)  # the same masks (masking methods draw them from the host RNG)
        a = trained(views, index, hierarchy, torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        b = restored(views, index, hierarchy, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.loss, b.loss)


def test_semantic_loss_is_wired_to_the_heads(batch, hierarchy) -> None:
    views, index = batch
    model = make_model("simclr", weight=0.5).eval()  # eval: deterministic BN for the replay
    out = model(views, index, hierarchy, torch.Generator().manual_seed(7))
    method_out = model.method(views)
    z = [F.normalize(head(method_out.projection), dim=1) for head in model.heads]
    expected = semantic_path_loss(z, index, hierarchy, 20, torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.semantic_loss, expected.detach())
    torch.testing.assert_close(out.method_loss, method_out.loss.detach())
    torch.testing.assert_close(out.loss, method_out.loss + 0.5 * expected)
    # The level order matters: swapping two heads changes the loss.
    swapped = semantic_path_loss(
        [z[1], z[0], z[2]], index, hierarchy, 20, torch.Generator().manual_seed(7)
    )
    assert not torch.allclose(swapped, expected)


def test_hierarchy_level_mismatch_is_reported(batch, hierarchy) -> None:
    views, index = batch
    model = HirlModel(make_method("simclr"), num_levels=2)
    with pytest.raises(ValueError, match="levels"):
        model(views, index, hierarchy)


@pytest.mark.parametrize("name", BUILTIN)
def test_build_method_and_from_config(name: str) -> None:
    cfg = ExperimentConfig(model=model_config(name), method=METHODS[name].Config())
    method = build_method(cfg)
    dim = 192 if METHODS[name].needs_vit else FEAT_DIM
    assert isinstance(method, METHODS[name]) and method.feat_dim == dim
    assert len(HirlModel.from_config(cfg).heads) == len(cfg.hirl.num_clusters)
    off = ExperimentConfig(
        model=model_config(name),
        method=METHODS[name].Config(),
        hirl=HirlConfig(enabled=False),
    )
    assert len(HirlModel.from_config(off).heads) == 0


# ---- protocol v2: presets, views, parameter groups --------------------------------------

PRESETS = Path(__file__).resolve().parents[1] / "experiments" / "small"


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_method_has_a_preset_naming_all_its_keys(name: str) -> None:
    path = PRESETS / f"{name}.yaml"
    assert path.is_file(), f"add experiments/small/{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    fields = {f.name for f in dataclasses.fields(METHODS[name].Config)}
    assert set(raw["method"]) == fields, f"{path.name}: method section != {sorted(fields)}"
    cfg = load_config(path)
    assert type(cfg.method) is METHODS[name].Config and cfg.method.name == name
    assert cfg.hirl.enabled and cfg.data.name == "synthetic"
    # Runnable: the preset's model trains a step with its own views.
    torch.manual_seed(0)
    model = HirlModel.from_config(cfg)
    tf = model.method.transform(cfg.data)
    image = (torch.rand(3, 40, 40) * 255).to(torch.uint8)
    views = [torch.stack(v) for v in zip(*[tf(image) for _ in range(4)], strict=True)]
    opt = torch.optim.SGD([p for g in model.param_groups() for p in g["params"]], lr=0.01)
    out = model(views, torch.arange(4))
    out.loss.backward()
    opt.step()
    assert torch.isfinite(out.loss)


def test_presets_folder_has_no_preset_without_a_method() -> None:
    assert {p.stem for p in PRESETS.glob("*.yaml")} <= set(BUILTIN)


def test_default_transform_is_two_simclr_views_drawn_as_before() -> None:
    from hirl_ray.data.transforms import MultiViewTransform, multi_view_transform

    cfg = load_config(None, {"data.image_size": 24})
    tf = make_method("simclr").transform(cfg.data)
    assert isinstance(tf, MultiViewTransform) and tf.num_views == 2
    image = (torch.rand(3, 30, 30, generator=torch.Generator().manual_seed(0)) * 255).byte()
    torch.manual_seed(3)
    views = tf(image)
    torch.manual_seed(3)
    before = multi_view_transform(24)(image)
    assert [v.shape for v in views] == [(3, 24, 24)] * 2
    assert all(torch.equal(a, b) for a, b in zip(views, before, strict=True))
    assert not torch.equal(views[0], views[1])


@pytest.mark.parametrize("name", BUILTIN)
def test_default_param_groups_hold_every_trainable_parameter_once(name: str) -> None:
    model = make_model(name)
    groups = model.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(set(ids)) == len(ids)
    # The HIRL heads are the last group, with no special keys (scheduled lr, weight decay).
    assert {id(p) for p in groups[-1]["params"]} == {id(p) for p in model.heads.parameters()}
    assert set(groups[-1]) == {"params"}
    own = len(make_model(name, hirl=False).param_groups())
    assert len(groups) == own + 1
    if name in CLASSIC:
        # The method's one group (SimSiam: encoder + fixed-lr predictor, official).
        assert own == (2 if name == "simsiam" else 1)
        assert set(groups[0]) == {"params"}  # train.weight_decay, scheduled lr


def test_simsiam_fix_pred_lr_keeps_the_predictor_at_the_base_lr(batch) -> None:
    from hirl_ray.config import TrainConfig
    from hirl_ray.train.loop import StaticHierarchy, train_epoch
    from hirl_ray.train.optim import build_optimizer

    torch.manual_seed(0)
    backbone, feat_dim = build_backbone(ModelConfig(backbone="small_cnn", width=WIDTH), SIZE)
    cls = METHODS["simsiam"]
    method = cls(backbone, feat_dim, cls.Config(proj_dim=PROJ_DIM, hidden_dim=64,
                                                fix_pred_lr=True))
    model = HirlModel(method, 0)
    groups = model.param_groups()
    assert [g.get("fixed_lr", False) for g in groups] == [False, True]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.predictor.parameters()}
    opt = build_optimizer(groups, TrainConfig(lr=0.2))
    views, index = batch
    train_epoch(model, [(views, index)] * 2, opt, epoch=0, step=50, total_steps=100, base_lr=0.2,
                warmup_steps=0, hierarchy=StaticHierarchy(None), device=torch.device("cpu"))
    encoder_lr, predictor_lr = (g["lr"] for g in opt.param_groups)
    assert predictor_lr == 0.2 and encoder_lr < 0.11  # cosine at step 51 of 100
    assert len(make_method("simsiam").param_groups()) == 2  # default on, as the official
    off = cls(backbone, feat_dim, cls.Config(proj_dim=PROJ_DIM, hidden_dim=64, fix_pred_lr=False))
    assert len(off.param_groups()) == 1


@pytest.mark.parametrize("name", CLASSIC)
def test_wrong_number_of_views_names_the_transform(name: str, batch) -> None:
    views, _ = batch
    with pytest.raises(ValueError, match=r"expects 2 views per image, got 3; its transform"):
        make_method(name)([*views, views[0]])


def test_iter_wise_assignment_uses_the_nearest_leaf_of_the_second_view(batch, hierarchy) -> None:
    """Official HIRL-SwAV: each step re-assigns its samples to their nearest level-0 prototype."""
    views, index = batch
    model = make_model("simclr").eval()
    model.iter_wise_assignment = True
    with torch.no_grad():
        feats = model.method.cluster_embed(views[1], "projection")
        leaf = (feats @ F.normalize(hierarchy.centroids[0], dim=1).T).argmax(1)
        out = model(views, index, hierarchy, torch.Generator().manual_seed(7))
        z = [F.normalize(head(model.method(views).projection), dim=1) for head in model.heads]
        expected = semantic_path_loss(z, index, hierarchy, 20, torch.Generator().manual_seed(7),
                                      leaf=leaf)
        stored = semantic_path_loss(z, index, hierarchy, 20, torch.Generator().manual_seed(7))
    torch.testing.assert_close(out.semantic_loss, expected)
    assert not torch.allclose(out.semantic_loss, stored)


def test_head_layers_sets_the_depth_of_every_level_head() -> None:
    cfg = load_config(None, {"hirl.head_layers": 5, "model.width": WIDTH})
    model = HirlModel.from_config(cfg)
    for head in model.heads:
        assert sum(isinstance(m, torch.nn.Linear) for m in head.modules()) == 5
    default = HirlModel.from_config(load_config(None, {"model.width": WIDTH}))
    assert sum(isinstance(m, torch.nn.Linear) for m in default.heads[0].modules()) == 2


@pytest.mark.parametrize("name", [n for n in BUILTIN if not METHODS[n].needs_vit])
def test_cnn_methods_also_train_a_vit(name: str, batch, hierarchy) -> None:
    """Any method takes any backbone: a ViT's [CLS] output stands where a CNN's pooled one was."""
    torch.manual_seed(0)
    cls = METHODS[name]
    own = {f.name for f in dataclasses.fields(cls.Config)}
    cfg = cls.Config(proj_dim=PROJ_DIM, hidden_dim=64,
                     **{k: v for k, v in {**KNOBS, "queue_size": 48}.items() if k in own})
    backbone, feat_dim = build_backbone(ModelConfig(backbone="vit_tiny", patch_size=4), SIZE)
    model = HirlModel(cls(backbone, feat_dim, cfg), len(LEVELS), num_neg_paths=20)
    views, index = batch
    out = model(views, index, hierarchy)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.semantic_loss is not None
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)
