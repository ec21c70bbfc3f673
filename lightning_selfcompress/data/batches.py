"""Samplers whose order is drawn from (seed, epoch) alone, so that a run resumed at an epoch boundary sees the data in
the same order as an uninterrupted one. Lightning calls `set_epoch` before each epoch, also when it resumes."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler, Sampler


def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator)


class ShuffledBatches(Sampler[list[int]]):
    """Whole batches of indices for in-memory datasets indexed with a batch at once; a fresh permutation each epoch.
    The last incomplete batch is dropped."""

    def __init__(self, size: int, batch_size: int, seed: int = 0) -> None:
        if size < batch_size:
            raise ValueError(f"{size} samples do not fill one batch of {batch_size}; lower batch_size.")
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.size, self.seed, self.epoch)
        yield from order[: len(self) * self.batch_size].view(len(self), self.batch_size).tolist()

    def __len__(self) -> int:
        return self.size // self.batch_size


class SeededBatches(ShuffledBatches):
    """`ShuffledBatches`, each batch paired with a seed of its own, drawn from (seed, epoch, position), for random
    augmentation that a resumed run repeats exactly: yields (indices, batch seed)."""

    def __iter__(self) -> Iterator[tuple[list[int], int]]:  # type: ignore[override]
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for position, batch in enumerate(super().__iter__()):
            yield batch, base + position


class ShuffledOrder(RandomSampler):
    """One index at a time, for datasets that workers read sample by sample (ImageFolder). A RandomSampler, so that
    Lightning sees a shuffled loader: under DDP it puts its own DistributedSampler, seeded and set per epoch, in its
    place."""

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        yield from epoch_permutation(len(self.data_source), self.seed, self.epoch).tolist()
