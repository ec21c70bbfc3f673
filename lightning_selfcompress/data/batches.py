"""Batches of indices for in-memory datasets, shuffled reproducibly per epoch so that a resumed run sees the data
in the same order as an uninterrupted one."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShuffledBatches(Sampler[list[int]]):
    """A fresh permutation each epoch, drawn from (seed, epoch) alone; Lightning calls `set_epoch` before each epoch,
    also when it resumes from a checkpoint. The last incomplete batch is dropped."""

    def __init__(self, size: int, batch_size: int, seed: int = 0) -> None:
        if size < batch_size:
            raise ValueError(f"{size} samples do not fill one batch of {batch_size}; lower batch_size.")
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        yield from order[: len(self) * self.batch_size].view(len(self), self.batch_size).tolist()

    def __len__(self) -> int:
        return self.size // self.batch_size
