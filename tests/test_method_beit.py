"""BEiT: block masks, the masked-token loss (only masked positions count), the kmeans and
TorchScript (dVAE) tokenizers, HIRL embeddings, the paper config, and one Ray fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hirl_ray
from hirl_ray.config import ConfigError, ExperimentConfig, ModelConfig, load_config
from hirl_ray.losses import masked_token_loss
from hirl_ray.methods import BEiT, BEiTConfig, build_method
from hirl_ray.models import build_backbone
from hirl_ray.models.tokenizers import KMeansTokenizer, patchify

from .conftest import tiny_config

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SIZE, PATCH, GRID, K = 16, 4, 4, 16


def make_beit(seed: int = 0, **cfg) -> BEiT:
    torch.manual_seed(seed)
    backbone, feat_dim = build_backbone(ModelConfig(backbone="vit_tiny", patch_size=PATCH), SIZE)
    args = {"proj_dim": 32, "hidden_dim": 64, "proj_layers": 2, "num_tokens": K, **cfg}
    return BEiT(backbone, feat_dim, BEiTConfig(**args))


def images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def fixed_mask(n: int) -> torch.Tensor:
    """Patches 0-5 masked in every image (row 0 and half of row 1 of the 4x4 grid)."""
    m = torch.zeros(n, GRID * GRID, dtype=torch.bool)
    m[:, :6] = True
    return m


# ---- masks -------------------------------------------------------------------------------

@pytest.mark.parametrize(("grid", "ratio"), [(14, 75 / 196), (8, 0.4)])
def test_masks_hold_about_the_ratio_in_blocks(grid: int, ratio: float) -> None:
    torch.manual_seed(0)
    method = make_beit(mask_ratio=ratio)
    masks = method.draw_masks(64, grid)
    target = round(ratio * grid * grid)
    counts = masks.sum(1)
    assert masks.shape == (64, grid * grid) and masks.dtype == torch.bool
    assert counts.max() <= target and counts.float().mean() >= 0.8 * target, counts
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks}) == 64  # random
    # Blocks, not scattered patches: most masked patches have a masked 4-neighbour.
    m = masks.view(64, grid, grid).float()
    nb = F.conv2d(m[:, None], torch.tensor([[[[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]]]), padding=1)
    assert ((nb[:, 0] > 0) & masks.view(64, grid, grid)).sum() >= 0.9 * masks.sum()


# ---- the loss ----------------------------------------------------------------------------

def test_masked_token_loss_is_the_mean_negative_log_likelihood() -> None:
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(10, 7, generator=g), torch.randint(0, 7, (10,), generator=g)
    expected = 0.0
    for row, t in zip(logits.tolist(), targets.tolist(), strict=True):  # BEiT Eq. 1 by hand
        expected -= row[t] - math.log(sum(math.exp(v) for v in row))
    torch.testing.assert_close(masked_token_loss(logits, targets), torch.tensor(expected / 10))
    # A divisor (the global masked count under DDP) replaces |M|.
    torch.testing.assert_close(masked_token_loss(logits, targets, 4.0),
                               torch.tensor(expected / 4))


def _loss_with(method: BEiT, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    method.tokenizer.forward = lambda _x: ids  # the tokenizer's ids of the unmasked image
    return method([x]).loss


def test_only_masked_positions_count_and_the_loss_replays_by_hand() -> None:
    method = make_beit().eval()  # eval: no drop path, BN running stats
    method.tokenizer.fitted.fill_(True)
    method.draw_masks = lambda b, grid: fixed_mask(b)
    x = images(4)
    ids = torch.randint(0, K, (4, GRID * GRID), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = _loss_with(method, x, ids)
        unmasked, masked = ids.clone(), ids.clone()
        unmasked[:, 10] = (ids[:, 10] + 1) % K  # position 10 is not masked
        masked[:, 2] = (ids[:, 2] + 1) % K  # position 2 is
        assert torch.equal(_loss_with(method, x, unmasked), loss)
        assert not torch.allclose(_loss_with(method, x, masked), loss)
        # By hand: head(projector(tokens of the masked image)) at the 6 masked patches.
        t = method.backbone.tokens(x, fixed_mask(4))[:, 1:7]
        logits = method.head(method.projector(t.reshape(-1, t.shape[-1])))
        expected = F.cross_entropy(logits, ids[:, :6].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_hirl_reads_the_masked_cls_and_patch_mean_projections() -> None:
    method = make_beit().eval()
    method.draw_masks = lambda b, grid: fixed_mask(b)
    x = images(4)
    with torch.no_grad():
        out = method([x, images(4, seed=1)])  # a second view only adds MIM samples
        t = method.backbone.tokens(x, fixed_mask(4))
        z = method.projector(t.reshape(-1, t.shape[-1])).view(4, 1 + GRID * GRID, -1)
    torch.testing.assert_close(out.embedding, t[:, 0])
    torch.testing.assert_close(out.projection, z[:, 0])
    torch.testing.assert_close(out.projection_mean, z[:, 1:].mean(1))
    assert not torch.allclose(out.embedding, method.backbone(x), atol=1e-3)  # masked != plain
    # Without a projector (official HIRL-BEiT) the heads read the ViT width directly.
    plain = make_beit(proj_layers=0)
    assert isinstance(plain.projector, nn.Identity) and plain.embedding_dim("vit_mean") == 192
    assert plain.head.in_features == 192


# ---- the kmeans tokenizer ----------------------------------------------------------------

def test_patchify_matches_the_vit_grid() -> None:
    x = images(2)
    p = patchify(x, PATCH)
    assert p.shape == (2, GRID * GRID, 3 * PATCH * PATCH)
    i = 6  # row 1, column 2
    torch.testing.assert_close(p[1, i], x[1, :, 4:8, 8:12].reshape(-1))


def test_kmeans_tokenizer_is_seeded_maps_its_codebook_to_itself_and_survives_a_round_trip(
        monkeypatch) -> None:
    patches = patchify(images(16), PATCH).flatten(0, 1)
    a, b, c = (KMeansTokenizer(K, PATCH) for _ in range(3))
    a.fit(patches, seed=3)
    b.fit(patches, seed=3)
    c.fit(patches, seed=4)
    assert a.is_fitted and torch.equal(a.codebook, b.codebook)
    assert not torch.equal(a.codebook, c.codebook)
    assert torch.equal(a.ids(a.codebook), torch.arange(K))
    c.load_state_dict(KMeansTokenizer(K, PATCH).state_dict())  # the loaded flag decides
    assert not c.is_fitted
    with pytest.raises(ValueError, match=r"method\.num_tokens \(16\)"):
        KMeansTokenizer(K, PATCH).fit(patches[:10], seed=0)

    # In a method: fitted once, in the first training forward, then kept (checkpoints too).
    method = make_beit()
    calls = []
    fit = KMeansTokenizer.fit
    monkeypatch.setattr(KMeansTokenizer, "fit",
                        lambda s, *a, **k: calls.append(1) or fit(s, *a, **k))
    method([images(8)])
    method([images(8, seed=1)])
    assert len(calls) == 1 and method.tokenizer.is_fitted
    restored = make_beit(seed=5)
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.tokenizer.codebook, method.tokenizer.codebook)
    restored([images(8, seed=2)])
    assert len(calls) == 1  # a resumed run does not refit
    x = images(4, seed=3)
    assert torch.equal(restored.tokenizer(x), method.tokenizer(x))


def test_kmeans_needs_enough_patches_in_the_first_batch() -> None:
    base = {"method.name": "beit", "model.backbone": "vit_tiny", "model.patch_size": 4,
            "train.batch_size": 4, "train.num_workers": 1}
    assert load_config(None, {**base, "method.num_tokens": 256})  # 4 x 64 patches
    with pytest.raises(ConfigError, match=r"method\.num_tokens \(257\) exceeds the 256"):
        load_config(None, {**base, "method.num_tokens": 257})


# ---- the dVAE (TorchScript) tokenizer ------------------------------------------------------

class _TinyDVAE(nn.Module):
    """A stand-in for DALL-E's encoder: [0, 1] images -> (B, 16, H/8, W/8) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, K, 8, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated
@pytest.mark.parametrize("fmt", ["export", "torchscript"])
def test_dvae_tokenizer_loads_from_a_path_and_a_missing_file_is_a_config_error(
        fmt: str, tmp_path) -> None:
    torch.manual_seed(0)
    net = _TinyDVAE()
    if fmt == "export":  # README "BEiT": the batch dimension is dynamic
        batch = torch.export.Dim("batch")
        program = torch.export.export(net, (torch.rand(2, 3, 32, 32),),
                                      dynamic_shapes=({0: batch},))
        torch.export.save(program, str(tmp_path / "dvae.pt"))
    else:
        torch.jit.script(net).save(str(tmp_path / "dvae.pt"))
    over = {"method.name": "beit", "method.tokenizer": "dvae", "method.num_tokens": K,
            "model.backbone": "vit_tiny", "model.patch_size": 4, "data.image_size": SIZE,
            "method.tokenizer_path": str(tmp_path / "dvae.pt")}
    method = build_method(load_config(None, over))
    x = images(2)
    rgb = (x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
           + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)).clamp(0, 1)
    rgb = F.interpolate(rgb, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        expected = net(rgb).argmax(1).flatten(1)  # 4x4 grid x stride 8 = 32 px in
    assert torch.equal(method.tokenizer(x, (GRID, GRID)), expected)
    out = method([x])
    assert torch.isfinite(out.loss)
    assert not any(p.requires_grad for p in method.tokenizer.net.parameters())
    # Frozen and outside the module tree: not trained, not in checkpoints (reloaded on resume).
    assert not any(k.startswith("tokenizer.") for k in method.state_dict())

    for bad, msg in ((str(tmp_path / "nope.pt"), r"method\.tokenizer_path: file .*nope\.pt "
                      r"not found"), ("", r"method\.tokenizer_path is required")):
        with pytest.raises(ConfigError, match=msg) as err:
            load_config(None, {**over, "method.tokenizer_path": bad})
        assert "\n" not in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="neither a torch.export program nor a TorchScript"):
        build_method(load_config(None, {**over,
                                        "method.tokenizer_path": str(tmp_path / "junk.pt")}))
    wrong = build_method(load_config(None, {**over, "method.num_tokens": 8}))
    with pytest.raises(ValueError, match=r"expected \(B, 8, 4, 4\)"):
        wrong([x])


# ---- configs and Ray ---------------------------------------------------------------------

def test_paper_config_has_the_official_settings() -> None:
    # Its tokenizer_path is a bucket URI: checked when the workers read it, like data.root.
    cfg = load_config(ROOT / "experiments" / "paper" / "hirl_beit_vit_b_16.yaml")
    m, t, h = cfg.method, cfg.train, cfg.hirl
    assert (m.name, m.tokenizer, m.num_tokens, m.proj_layers) == ("beit", "dvae", 8192, 0)
    assert round(m.mask_ratio * 196) == 75
    assert (cfg.model.backbone, cfg.model.drop_path, cfg.data.image_size) == ("vit_b_16", 0.1, 224)
    assert (t.optimizer, t.lr, t.min_lr, t.weight_decay, t.grad_clip) == (
        "adamw", 1.5e-3, 1e-5, 0.05, 3.0)
    assert (t.epochs, t.warmup_lr_epochs, t.batch_size) == (400, 10, 2048)
    assert h.num_clusters == (30000, 10000, 1000) and h.num_neg_paths == 100
    assert (h.warmup_epochs, h.embedding) == (40, "vit_cls")
    assert isinstance(cfg, ExperimentConfig)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_ray_fit_with_hirl(tmp_path) -> None:
    over = tiny_config(tmp_path, **{
        "method.name": "beit", "model.backbone": "vit_tiny", "model.patch_size": 8,
        "method.num_tokens": 64, "method.proj_layers": 2, "hirl.embedding": "vit_mean",
        "train.epochs": 2, "train.num_workers": 1, "train.optimizer": "adamw",
        "train.lr": 1e-3, "data.train_per_class": 4,
        "hirl.async_rebuild": False})  # the hierarchy is there for the second epoch's steps
    result = hirl_ray.fit(None, over)
    from hirl_ray.train.checkpoint import find_checkpoints, load_state, read_meta

    metas = [read_meta(p) for p in find_checkpoints(Path(result.run_dir))]
    assert [m.epoch for m in metas] == [1, 2]
    assert not metas[0].metrics["hirl_active"] and metas[1].metrics["hirl_active"]
    assert math.isfinite(metas[1].metrics["semantic_loss"])
    backbone, preprocess = hirl_ray.load_backbone(result.checkpoint_path)  # no [MASK] token
    assert backbone.mask_token is None
    model = load_state(result.checkpoint_path)["model"]
    assert bool(model["method.tokenizer.fitted"])  # the codebook travels in the checkpoint
    assert model["method.tokenizer.codebook"].abs().sum() > 0
