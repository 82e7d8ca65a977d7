"""SSL methods under DDP: 1 worker × 2B and 2 workers × B give the same losses, gradients,
BN statistics and MoCo queue (negatives/keys gathered, SyncBN on CPU/gloo); seeded data
order; the batch-divisibility error.

The two-rank runs are two spawned processes on gloo over 127.0.0.1, each wrapping the model
in DDP with the training kwargs, so the test also catches gradient scaling bugs of the
gather (lightly #1528, #1920, #1977) and DDP broadcasting the queue.
"""

from __future__ import annotations

import copy
import datetime
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hirl_ray.config import ConfigError, ModelConfig, load_config
from hirl_ray.methods import METHODS, HirlModel
from hirl_ray.methods.distributed import (
    broadcast_buffers,
    convert_sync_batchnorm,
    ddp_kwargs,
    gather_no_grad,
)
from hirl_ray.models import build_backbone
from hirl_ray.models.masking import random_block_masks

WORLD, B, SIZE, STEPS, QUEUE = 2, 4, 16, 2, 24
CASES = (("simclr", True), ("mocov2", True), ("mocov2", False),  # (method, sync_bn)
         ("swav", True), ("mocov3", True), ("beit", True), ("dino", True), ("ibot", True))


def make_model(name: str, sync_bn: bool, device: str = "cpu", rows: slice = slice(None)
               ) -> HirlModel:
    """The same initial weights in every process (seeded), BN converted as in training.

    iBOT draws its masks on each rank: they are pinned to the global batch's, ``rows`` of them.
    """
    torch.manual_seed(0)
    knobs = {"temperature": 0.2, "momentum": 0.9, "queue_size": QUEUE,
             # SwAV: its queue (2 global crops x WORLD*B rows) is full after step 1, so step 2's
             # Sinkhorn runs over each rank's slice of it plus the global batch.
             "num_prototypes": 10, "num_local_crops": 0, "queue_length": WORLD * B,
             "queue_start_epochs": 0, "freeze_prototypes_steps": 0,
             # BEiT: a small codebook; a projector so its embedding has proj_dim columns.
             "num_tokens": 16, "proj_layers": 2,
             # DINO/iBOT: small heads, global crops only.
             "out_dim": 32, "patch_out_dim": 32, "freeze_last_layer_epochs": 0}
    cls = METHODS[name].Config
    cfg = cls(proj_dim=16, hidden_dim=32,
              **{k: v for k, v in knobs.items() if k in cls.__dataclass_fields__})
    backbone_cfg = (ModelConfig(backbone="vit_tiny", patch_size=4) if METHODS[name].needs_vit
                    else ModelConfig(backbone="small_cnn", width=8))
    backbone, feat_dim = build_backbone(backbone_cfg, SIZE)
    model = HirlModel(METHODS[name](backbone, feat_dim, cfg), num_levels=0)
    if name == "ibot":
        g = torch.Generator().manual_seed(2)
        masks = torch.rand(2, WORLD * B, (SIZE // 4) ** 2, generator=g) < 0.4
        model.method.draw_masks = lambda batch, grid: masks[:, rows]
    model = convert_sync_batchnorm(model, device) if sync_bn else model
    return model.to(device)


def fix_masks(model: HirlModel, rows: slice = slice(None)) -> None:
    """BEiT: the masks one worker draws for the global batch, each rank its rows
    (the host RNG is seeded per rank, so ranks would draw other masks than one worker)."""
    g = torch.Generator().manual_seed(2)  # rows of the view-major batch torch.cat(views)
    masks = iter([random_block_masks(2 * WORLD * B, SIZE // 4, (0.1, 0.6), g)
                  .view(2, WORLD * B, -1)[:, rows].flatten(0, 1) for _ in range(STEPS)])
    model.method.draw_masks = lambda batch, grid: next(masks)


def global_batches(device: str = "cpu") -> list[list[torch.Tensor]]:
    """STEPS batches of two views of WORLD·B images; rank r takes rows r·B:(r+1)·B."""
    g = torch.Generator().manual_seed(1)
    base = [torch.rand(WORLD * B, 3, SIZE, SIZE, generator=g) for _ in range(STEPS)]
    return [[(x + 0.1 * torch.randn(x.shape, generator=g)).to(device) for _ in range(2)]
            for x in base]


def run_steps(model, batches, index) -> dict:
    """SGD steps as the training loop takes them; losses, step-1 grads, final state."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inner = getattr(model, "module", model)
    out: dict = {"loss": [], "queue": []}
    for step, views in enumerate(batches):
        loss = model(views, index).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            out["grad"] = {n: p.grad.to("cpu", copy=True) for n, p in inner.named_parameters()
                           if p.grad is not None}
        opt.step()
        inner.update_target((step + 1) / len(batches))
        loss = loss.detach().clone()
        if dist.is_initialized():  # the loss of the global batch = mean of the ranks' losses
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        out["loss"].append(loss.item())
        if hasattr(inner.method, "queue"):
            out["queue"].append(inner.method.queue.to("cpu", copy=True))
    out["state"] = {k: v.to("cpu", copy=True) for k, v in inner.state_dict().items()}
    return out


def _rank_main(rank: int, port: int, out_dir: str, device: str) -> None:
    torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False  # TF32 convs alone differ by more than 1e-4
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(100 + rank)  # ranks' RNGs differ, as in the worker (seed + rank)
    results = {}
    rows = slice(rank * B, (rank + 1) * B)
    for name, sync_bn in CASES:
        model = make_model(name, sync_bn, device, rows)
        if name == "mocov2" and rank > 0:  # DDP's init sync must make the queues agree
            model.method.queue.copy_(torch.nn.functional.normalize(
                torch.randn(model.method.queue.shape), dim=1))
        kwargs = ddp_kwargs()
        if device != "cpu":
            kwargs["device_ids"] = [torch.device(device).index or 0]
        if name == "beit":  # iBOT's masks are pinned in make_model
            fix_masks(model, rows)
        ddp = torch.nn.parallel.DistributedDataParallel(model, **kwargs)
        if "broadcast_buffers" in kwargs:  # older torch: no buffer sync at init either
            broadcast_buffers(model)
        batches = [[v[rows] for v in views] for views in global_batches(device)]
        if name == "mocov2":  # this rank's keys of the first batch, without shuffle-BN
            key_model = copy.deepcopy(model.method)
            results[f"{name}-{sync_bn}-unshuffled"] = gather_no_grad(
                key_model._keys(torch.cat(batches[0]))).cpu()
        results[f"{name}-{sync_bn}"] = run_steps(
            ddp, batches, torch.arange(B, device=device) + rank * B)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two_ranks(out_dir: Path, device: str) -> list[dict]:
    """Results of the CASES on two gloo ranks on ``device``."""
    ctx = mp.start_processes(_rank_main, args=(_free_port(), str(out_dir), device),
                             nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("two-rank DDP run did not finish within 300 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """The CASES on two CPU ranks (spawned once for the module)."""
    return spawn_two_ranks(tmp_path_factory.mktemp("ddp"), "cpu")


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}")


def check_equal_to_one_worker(name: str, results: list[dict], device: str = "cpu") -> None:
    """Same losses, DDP-averaged gradients, and parameters/BN stats/queue after two steps."""
    model = make_model(name, True, device)
    if name == "beit":
        fix_masks(model)
    ref = run_steps(model, global_batches(device), torch.arange(WORLD * B, device=device))
    for rank, res in enumerate(results):
        got = res[f"{name}-True"]
        close(torch.tensor(got["loss"]), torch.tensor(ref["loss"]), f"rank {rank} losses")
        assert got["grad"].keys() == ref["grad"].keys()
        for k, g in ref["grad"].items():
            close(got["grad"][k], g, f"rank {rank} grad {k}")
        for k, v in ref["state"].items():  # weights, key encoder, BN running stats, queue
            close(got["state"][k].to(v.dtype), v, f"rank {rank} state {k}")


@pytest.mark.parametrize("name", ["simclr", "mocov2", "swav", "mocov3", "beit", "dino",
                                  "ibot"])
def test_two_workers_equal_one_worker_with_the_global_batch(name: str, two_ranks) -> None:
    torch.set_num_threads(1)
    check_equal_to_one_worker(name, two_ranks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_workers_equal_one_worker_on_cuda(tmp_path) -> None:
    """The same on one GPU shared by two gloo ranks: PyTorch's own SyncBatchNorm (CUDA) and
    the gathers on CUDA tensors (NCCL would need one GPU per rank)."""
    torch.backends.cudnn.allow_tf32 = False
    results = spawn_two_ranks(tmp_path, "cuda")
    for name in ("simclr", "mocov2", "swav", "mocov3"):
        check_equal_to_one_worker(name, results, "cuda")
    q = [res["mocov2-False"]["queue"][0] for res in results]
    assert torch.equal(q[0], q[1])  # shuffle-BN on CUDA: the queues still agree


def test_moco_queue_holds_every_ranks_keys_and_is_identical(two_ranks) -> None:
    ref = run_steps(make_model("mocov2", True), global_batches()[:1], torch.arange(WORLD * B))
    q = [res["mocov2-True"]["queue"][0] for res in two_ranks]
    assert torch.equal(q[0], q[1])
    # After one step the first 2·WORLD·B slots hold both views' keys of the global batch,
    # in the order one worker enqueues them; the rest is still the random initial queue.
    n = 2 * WORLD * B
    close(q[0][:n], ref["queue"][0][:n], "queue after step 1")
    for rank, res in enumerate(two_ranks):
        keys = res["mocov2-True-unshuffled"][rank * 2 * B:(rank + 1) * 2 * B]
        for k in keys:  # this rank's keys sit in rank 0's queue
            assert (q[0] - k).abs().amax(dim=1).min() < 1e-4
    assert int(two_ranks[0]["mocov2-True"]["state"]["method.queue_ptr"]) == (STEPS * n) % QUEUE


def test_moco_shuffle_bn_without_sync_bn(two_ranks) -> None:
    """Plain BN: keys come from batches shuffled across ranks; the queue still agrees."""
    q = [res["mocov2-False"]["queue"][0] for res in two_ranks]
    assert torch.equal(q[0], q[1])
    n = 2 * WORLD * B
    unshuffled = two_ranks[0]["mocov2-False-unshuffled"]
    assert unshuffled.shape[0] == n  # gathered from both ranks
    # Same images, same key encoder, different BN batch-mates → different keys.
    view_major = unshuffled.view(WORLD, 2, B, -1).transpose(0, 1).reshape(n, -1)
    assert (q[0][:n] - view_major).abs().max() > 1e-3
    assert all(r == r for r in two_ranks[0]["mocov2-False"]["loss"])


def test_batch_size_must_divide_by_num_workers() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size \(130\).*train\.num_workers \(4\)"):
        load_config(None, {"train.batch_size": 130, "train.num_workers": 4})
    assert load_config(None, {"train.batch_size": 132, "train.num_workers": 4})


def test_seed_changes_the_order_a_worker_sees() -> None:
    from hirl_ray.data import build_dataset, multi_view_transform
    from hirl_ray.train.steps import build_train_loader

    def order(seed: int, rank: int, epoch: int = 0) -> list[int]:
        cfg = load_config(None, {"train.seed": seed, "train.batch_size": 16,
                                 "data.train_per_class": 4})
        loader = build_train_loader(cfg, build_dataset(cfg.data, "train"),
                                    multi_view_transform(32), rank, world=2)
        loader.sampler.set_epoch(epoch)
        return [i for _, idx in loader for i in idx.tolist()]

    a = order(0, rank=0)
    assert len(a) % 8 == 0 and len(a) > 0  # 16 / 2 workers per step, full batches only
    assert order(0, rank=0) == a  # reproducible
    assert order(1, rank=0) != a  # train.seed reaches the sampler
    assert order(0, rank=0, epoch=1) != a  # set_epoch reshuffles
    assert not set(a) & set(order(0, rank=1))  # the ranks' shares are disjoint
