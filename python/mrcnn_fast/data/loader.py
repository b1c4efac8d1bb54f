"""Deterministic data loaders: an infinite, resumable training stream and a sharded evaluation pass.

Training order is a pure function of (seed, iteration): the stream is the concatenation of per-epoch
permutations, permutation e drawn from (seed, e); iteration i of a run with world size W and per-process batch
size B consumes stream positions [i*B*W, (i+1)*B*W), rank r the r-th B of them. Resuming at start_iter=k
therefore yields exactly the batches k, k+1, ... of an uninterrupted run, and the W ranks together see every
image once per epoch. Datasets that set ``accepts_seeded_index`` (CocoDetection) receive (index, seed) pairs
with a seed derived from (seed, stream position), so random augmentations replay identically too.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..ops._checks import check_int

__all__ = ["collate", "build_loader", "TrainBatchSampler", "EvalBatchSampler"]

_MASK64 = (1 << 64) - 1


def collate(batch):
    """[(image, target), ...] -> (list of images, list of targets); no stacking: images keep their own sizes."""
    return [b[0] for b in batch], [b[1] for b in batch]


def _sampler_args(size, batch_size, rank, world_size, min_size: int) -> tuple[int, int, int, int]:
    size = check_int(size, "dataset size", minimum=min_size)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    world_size = check_int(world_size, "world_size", minimum=1)
    rank = check_int(rank, "rank", minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    return size, batch_size, rank, world_size


class TrainBatchSampler(Sampler):
    """Infinite batches of indices (or (index, seed) pairs) for one rank; see the module docstring."""

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_iter: int = 0, seeded: bool = False):
        self.size, self.batch_size, self.rank, self.world_size = _sampler_args(size, batch_size, rank, world_size, 1)
        self.start_iter = check_int(start_iter, "start_iter", minimum=0)
        self.seed = int(seed) & _MASK64
        self.seeded = bool(seeded)
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm_cache = (epoch, rng.permutation(self.size))
        return self._perm_cache[1]

    def sample_seed(self, position: int) -> int:
        """The augmentation seed of a stream position (independent of rank count and resume point)."""
        return int(np.random.SeedSequence([self.seed, position, 0xA5]).generate_state(1, np.uint64)[0])

    def batch(self, iteration: int) -> list:
        start = (iteration * self.world_size + self.rank) * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            idx = int(self.permutation(pos // self.size)[pos % self.size])
            out.append((idx, self.sample_seed(pos)) if self.seeded else idx)
        return out

    def __iter__(self) -> Iterator[list]:
        it = self.start_iter
        while True:
            yield self.batch(it)
            it += 1


class EvalBatchSampler(Sampler):
    """Sequential batches over this rank's contiguous shard; shards cover every index exactly once."""

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.rank, self.world_size = _sampler_args(size, batch_size, rank, world_size, 0)
        self.begin = self.size * self.rank // self.world_size
        self.end = self.size * (self.rank + 1) // self.world_size

    def indices(self) -> list[int]:
        return list(range(self.begin, self.end))

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.begin, self.end, self.batch_size):
            yield list(range(b, min(b + self.batch_size, self.end)))

    def __len__(self) -> int:
        return -(-(self.end - self.begin) // self.batch_size)


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it so that any
    # augmentation that does not use a seeded index is reproducible as well.
    s = torch.initial_seed() & _MASK64
    np.random.seed(s & 0xFFFFFFFF)
    random.seed(s)


def build_loader(dataset, batch_size: int, *, train: bool, num_workers: int = 0, seed: int = 0,
                 distributed: bool = False, rank: int = 0, world_size: int = 1, start_iter: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding (list[image], list[target]) batches (see collate).

    Args:
        dataset: a map-style dataset (e.g. CocoDetection).
        batch_size: images per batch on this process (the global batch is batch_size * world_size).
        train: True: infinite shuffled stream, deterministic in (seed, iteration), starting at start_iter.
            False: one sequential pass over this rank's shard (each image exactly once across ranks, the last
            batch may be smaller, a rank may get none when there are fewer images than ranks).
        num_workers: DataLoader worker processes (0: load in the main process).
        distributed, rank, world_size: sharding; with distributed=False, rank/world_size must be 0/1.
        start_iter: training iteration to resume from.
    """
    num_workers = check_int(num_workers, "num_workers", minimum=0)
    if not distributed and (rank != 0 or world_size != 1):
        raise ValueError(f"rank={rank}, world_size={world_size} given with distributed=False")
    n = len(dataset)
    if train:
        if n == 0:
            raise ValueError("cannot build a training loader over an empty dataset")
        sampler = TrainBatchSampler(n, batch_size, seed=seed, rank=rank, world_size=world_size,
                                    start_iter=start_iter, seeded=getattr(dataset, "accepts_seeded_index", False))
    else:
        sampler = EvalBatchSampler(n, batch_size, rank=rank, world_size=world_size)
    generator = torch.Generator()
    generator.manual_seed((int(seed) * 1_000_003 + rank) & 0x7FFFFFFFFFFFFFFF)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        generator=generator,
        persistent_workers=False,
    )
