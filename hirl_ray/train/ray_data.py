"""``data.loader=ray_data``: the training split as a Ray Dataset, decoded on the cluster's CPUs.

Driver side (:func:`train_datasets`): a Dataset of the training indices, shuffled again every
epoch (``random_shuffle`` with a :class:`~ray.data.RandomSeedConfig` reseeded per execution,
from ``train.seed``), then :class:`~hirl_ray.data.ingest.DecodeViews` in an autoscaling pool
of actors (``data.ray_data_cpus`` CPUs each, at most ``data.ray_data_max_actors``) placed on
any node with free CPUs, CPU-only nodes included. The images stay where they are: an
``s3://`` image folder is listed once by the driver and each image is read by the actor that
decodes it; nothing is copied to the training nodes.

Worker side (:class:`ShardLoader`): ``ray.train.get_dataset_shard("train")`` batches as the
torch loader's ``(views, index)``, ``train.batch_size / world`` per step, ragged last batch
dropped. Ray Train splits the stream with ``streaming_split(equal=True)``, which drops the
``N mod world`` rows that would make shares unequal and never repeats one, so every index is
trained on at most once an epoch, and exactly once when ``train.batch_size`` divides N
(``index_missed`` / ``index_repeats`` in the epoch metrics say so).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from hirl_ray.config import ExperimentConfig
from hirl_ray.data import build_dataset
from hirl_ray.data.base import HierDataset
from hirl_ray.data.ingest import INDEX, DecodeViews, collate_views, steps_per_epoch
from hirl_ray.methods.base import build_method

#: Name of the training Dataset given to the TorchTrainer (``get_dataset_shard``).
TRAIN = "train"
#: At most this many blocks of indices (ImageNet: ~6,000 indices a block).
INDEX_BLOCKS = 200


class _DecodeActor(DecodeViews):
    """:class:`DecodeViews` whose source comes as an object ref (one copy in the object store
    for every actor and worker, not one pickled into each actor's constructor)."""

    def __init__(self, source_ref: list[Any], transform: Any, seed: int) -> None:
        super().__init__(ray.get(source_ref[0]), transform, seed)


def train_source(cfg: ExperimentConfig) -> HierDataset:
    """The training split without a local copy (an ``s3://`` image folder is only listed)."""
    return build_dataset(cfg.data, "train", local_copy=False)


def train_datasets(cfg: ExperimentConfig, source_ref: Any, num_samples: int,
                   transform: Any = None) -> dict[str, ray.data.Dataset]:
    """``datasets=`` of the TorchTrainer: the shuffled, decoded training views.

    ``source_ref``: ``ray.put`` of :func:`train_source`. The views are the method's own
    (``method.transform(data)``, the transform the torch loader applies) unless ``transform``
    is given (tests).
    """
    transform = transform or build_method(cfg).transform(cfg.data)
    d = cfg.data
    per_worker = cfg.train.batch_size // cfg.train.num_workers
    seed = ray.data.RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
    # Blocks of indices put by the driver (no read tasks); enough of them for the decode pool
    # to work in parallel. Only 8-byte indices are shuffled: cheap at any N; the shuffle's
    # tasks take the decode actors' CPU share (a default 1-CPU task may never fit beside them).
    blocks = [pa.table({INDEX: chunk}) for chunk in
              np.array_split(np.arange(num_samples, dtype=np.int64),
                             max(1, min(num_samples // per_worker, INDEX_BLOCKS)))]
    ds = (ray.data.from_arrow(blocks)
          .random_shuffle(seed=seed, num_cpus=d.ray_data_cpus)
          .map_batches(_DecodeActor, batch_size=min(per_worker, 64),
                       # In a list: Ray Data would not resolve a bare ref for the actor.
                       fn_constructor_kwargs={"source_ref": [source_ref], "transform": transform,
                                              "seed": cfg.train.seed},
                       num_cpus=d.ray_data_cpus,
                       compute=ray.data.ActorPoolStrategy(
                           min_size=1, max_size=d.ray_data_max_actors or None)))
    # One progress line per operator per second from the split coordinator floods the log of
    # a long run; Ray's dashboard shows the Dataset's progress.
    ds.context.enable_progress_bars = False
    return {TRAIN: ds}


class _Collate(NumpyBatchCollateFn):
    """:func:`~hirl_ray.data.ingest.collate_views` as the callable class Ray Data asks for."""

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return collate_views(batch)


class ShardLoader:
    """This worker's share of the Ray Dataset as ``(views, index)`` batches, like a DataLoader.

    ``len()`` is the number of steps per epoch (the learning-rate schedule needs it before
    the first batch); iteration checks that Ray delivered exactly that many, since ranks
    taking different numbers of steps would hang in DDP's all-reduce.
    """

    def __init__(self, cfg: ExperimentConfig, num_samples: int, world: int) -> None:
        self.batch_size = cfg.train.batch_size // world
        self.steps = steps_per_epoch(num_samples, world, self.batch_size)
        self.pin_memory = cfg.train.use_gpu
        self.shard = ray.train.get_dataset_shard(TRAIN)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        n = 0
        for index, *views in self.shard.iter_torch_batches(
                batch_size=self.batch_size, drop_last=True, collate_fn=_Collate(),
                pin_memory=self.pin_memory, prefetch_batches=2):
            n += 1
            yield views, index
        if n != self.steps:
            raise RuntimeError(f"the Ray Data shard gave {n} batches this epoch, expected "
                               f"{self.steps}; the workers' shares were not equal")
