"""Samplers whose order is drawn from (seed, epoch) alone, so that a resumed run sees the data in the same order as an
uninterrupted one. Lightning calls `set_epoch` before each epoch, also when it resumes; a run resumed mid-epoch
starts at the first batch its checkpoint had not trained on (`batches_done`). Under DDP each rank draws its slice of
the same global batches, so that N processes train on what one process at N times the batch would."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DistributedSampler, RandomSampler


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def batches_done(trainer: Any) -> int:
    """Batches of the current epoch that `trainer` has already trained on: 0 at the start of an epoch, more only when a
    run resumes from a checkpoint taken mid-epoch (Lightning restores its progress counters, not the loader)."""
    if trainer is None or not trainer.training:
        return 0
    return trainer.fit_loop.epoch_loop.batch_progress.current.completed


class ShuffledBatches(DistributedSampler):
    """Whole batches of indices for in-memory datasets indexed with a batch at once; a fresh permutation each epoch.
    The last incomplete global batch is dropped. `skip()` says how many batches of this epoch to leave out at its
    start (`batches_done` of the trainer: what a resumed run already trained on); read when iteration begins.

    With `world_size` processes, step k's global batch is the one a single process with `world_size * batch_size`
    would draw, and `rank` takes its own `batch_size` slice of it. A `DistributedSampler`, so that Lightning keeps
    it rather than dealing whole batches to the ranks in an order of its own."""

    def __init__(
        self, size: int, batch_size: int, seed: int = 0, skip: Callable[[], int] | None = None,
        rank: int = 0, world_size: int = 1,
    ) -> None:  # fmt: skip
        if size < batch_size * world_size:
            raise ValueError(
                f"{size} samples do not fill one batch of {batch_size} on each of {world_size} process(es); "
                "lower batch_size."
            )
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.size, self.batch_size, self.skip = size, batch_size, skip

    @classmethod
    def for_trainer(cls, size: int, batch_size: int, seed: int, trainer: Any) -> ShuffledBatches:
        """The sampler a data module gives `trainer` (or None): this process's slice, resumed where a checkpoint
        stopped."""
        if trainer is None:
            return cls(size, batch_size, seed)
        ranks = {"rank": trainer.global_rank, "world_size": trainer.world_size}
        return cls(size, batch_size, seed, skip=lambda: batches_done(trainer), **ranks)

    def __iter__(self) -> Iterator[Any]:
        steps, ranks = len(self), self.num_replicas
        order = epoch_permutation(self.size, self.seed, self.epoch)[: steps * ranks * self.batch_size]
        batches = order.view(steps, ranks, self.batch_size)[:, self.rank].tolist()
        done = self.skip() if self.skip else 0
        # a whole epoch done is nothing to skip: what reads batches after it (an export at the end of a run that
        # stopped on an epoch's last batch, where Lightning's counter still says every batch is done) starts over
        for position in range(done if done < steps else 0, steps):
            yield self._item(position, batches[position])

    def _item(self, position: int, batch: list[int]) -> Any:
        return batch

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.num_replicas)


class SeededBatches(ShuffledBatches):
    """`ShuffledBatches`, each batch paired with a seed of its own, drawn from (seed, epoch, position, rank), for random
    augmentation that a resumed run repeats exactly: yields (indices, batch seed). Augmentation draws per batch, so
    it is not the same for N processes as for one process with N times the batch."""

    def _item(self, position: int, batch: list[int]) -> tuple[list[int], int]:
        return batch, epoch_seed(epoch_seed(self.seed, self.epoch), position * self.num_replicas + self.rank)


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
