"""CIFAR-10 as a LightningDataModule, read from the official "python version" into memory.

Layout (as https://www.cs.toronto.edu/~kriz/cifar.html ships it, and torchvision downloads it):
`cifar-10-batches-py/data_batch_1` ... `data_batch_5` and `test_batch`, each a pickled dict with b"data", uint8
[N, 3072] (1024 red, then green, then blue values, row-major 32 x 32), and b"labels", N integers in 0..9. The files
are pickles: read only the official archive or files you wrote yourself.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from .batches import SeededBatches, ShuffledBatches

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
TRAIN_SIZE = 50_000
MEAN = (0.4914, 0.4822, 0.4465)  # per channel, over every pixel of the training set
STD = (0.2470, 0.2435, 0.2616)


def read_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One pickled batch file as (uint8 images [N, 3, 32, 32], int64 labels [N]); a clear error if it is not one."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except Exception as error:  # noqa: BLE001 - unpickling fails in many ways, all with the same meaning
        raise ValueError(f"{path} is not a CIFAR-10 batch file (unpickling failed: {error}).") from error
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(
            f"{path} is not a CIFAR-10 batch file: expected a dict with b'data' and b'labels', found {keys}."
        )
    data, labels = torch.as_tensor(entry[b"data"]), torch.as_tensor(entry[b"labels"], dtype=torch.int64)
    if data.dtype != torch.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(
            f"{path} is malformed: b'data' must be uint8 [N, 3072] with N labels, found {data.dtype} "
            f"{tuple(data.shape)} and {len(labels)} labels."
        )
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        low, high = int(labels.min()), int(labels.max())
        raise ValueError(f"{path} is malformed: labels must lie in 0..9, found {low}..{high}.")
    return data.view(-1, 3, 32, 32), labels


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Per image: a random window of the image's own size from the zero-padded image, then a mirror with
    probability 1/2 (the standard CIFAR augmentation; torchvision's RandomCrop(padding) + RandomHorizontalFlip)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    rows = (top + torch.arange(h).view(1, h, 1)).expand(n, h, w)
    cols = (left + torch.arange(w).view(1, 1, w)).expand(n, h, w)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1, 1), cols.flip(-1), cols)
    return padded[torch.arange(n).view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2)


class CIFARImages(Dataset):
    """uint8 images held in memory, indexed with a whole batch at once: `[indices]` gives them normalised,
    `[(indices, seed)]` cropped and flipped at random from `seed` first."""

    def __init__(self, images: Tensor, labels: Tensor, padding: int = 4) -> None:
        self.images, self.labels, self.padding = images, labels, padding
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: list[int] | tuple[list[int], int]) -> tuple[Tensor, Tensor]:
        indices, seed = key if isinstance(key, tuple) else (key, None)
        images = self.images[indices]
        if seed is not None:
            images = random_crop_flip(images, self.padding, torch.Generator().manual_seed(seed))
        return (images.float() - self.mean) / self.std, self.labels[indices]


class CIFAR10DataModule(pl.LightningDataModule):
    """Train/validation/test loaders over CIFAR-10 as normalised float [N, 3, 32, 32] batches.

    `val_size` training images, drawn at random from `split_seed`, form the validation set (the same set whatever the
    training `seed`). Training batches are shuffled and augmented (random crop with 4 pixels of zero padding,
    horizontal flip) from (`seed`, epoch, batch), so a resumed run, also one resumed mid-epoch, sees exactly the batches
    of an uninterrupted one. `data_dir` is the `cifar-10-batches-py` folder or the folder that holds it; None: the cache
    folder, where `download=True` lets torchvision fetch the archive.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 512,
        val_size: int = 5000,
        download: bool = False,
        cache_dir: str = "~/.cache/lightning_selfcompress",
        limit_train: int | None = None,
        augment: bool = True,
        seed: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        if not 0 <= val_size < TRAIN_SIZE:
            raise ValueError(f"val_size={val_size} must be in [0, {TRAIN_SIZE}).")
        if limit_train is not None and limit_train < 1:
            raise ValueError(f"limit_train={limit_train} must be None (all) or >= 1.")
        self.data_dir, self.batch_size, self.val_size, self.download = data_dir, batch_size, val_size, download
        self.cache_dir = Path(os.path.expanduser(cache_dir))
        self.limit_train, self.augment, self.seed, self.split_seed = limit_train, augment, seed, split_seed
        self.datasets: dict[str, CIFARImages] = {}

    def resolve_dir(self) -> Path:
        """The `cifar-10-batches-py` folder, downloading it if allowed; a clear error naming what is missing."""
        expected = f"{FOLDER}/ with {', '.join(TRAIN_FILES)} and {TEST_FILE} (CIFAR-10's python version)"
        if self.data_dir is not None:
            given = Path(os.path.expanduser(self.data_dir))
            directory = given if given.name == FOLDER or not (given / FOLDER).is_dir() else given / FOLDER
            if not directory.is_dir():
                raise FileNotFoundError(f"data_dir={str(given)!r} does not exist: point it at {expected}.")
            missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (directory / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{str(directory)!r} lacks {missing}: point data_dir at {expected}.")
            return directory
        directory = self.cache_dir / FOLDER
        if not (directory / TEST_FILE).is_file():
            if not self.download:
                raise FileNotFoundError(
                    f"CIFAR-10 not found in {directory}. Pass data_dir=<folder holding {expected}>, or set "
                    "download=true to fetch it with torchvision."
                )
            from torchvision.datasets import CIFAR10

            try:
                CIFAR10(str(self.cache_dir), train=True, download=True)
            except Exception as error:  # noqa: BLE001 - any network failure gets the same advice
                raise RuntimeError(
                    f"Downloading CIFAR-10 into {self.cache_dir} failed ({error}). Without a network, pass "
                    f"data_dir=<folder holding {expected}>."
                ) from error
        return directory

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        directory = self.resolve_dir()
        parts = [read_batch(directory / name) for name in TRAIN_FILES]
        images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if len(images) <= self.val_size:
            raise ValueError(
                f"{directory} holds {len(images)} training images, not more than val_size={self.val_size}."
            )
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.split_seed))
        val, train = order[: self.val_size], order[self.val_size :][: self.limit_train]
        self.datasets["train"] = CIFARImages(images[train], labels[train])
        self.datasets["val"] = CIFARImages(images[val], labels[val])
        self.datasets["test"] = CIFARImages(*read_batch(directory / TEST_FILE))

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        sampler = SeededBatches if self.augment else ShuffledBatches
        batches = sampler.for_trainer(len(data), self.batch_size, self.seed, self.trainer)
        # batch_size=None: the dataset is indexed with a whole batch of indices at once.
        return DataLoader(data, sampler=batches, batch_size=None)

    def _eval_loader(self, split: str) -> DataLoader:
        data = self.datasets[split]
        return DataLoader(data, sampler=BatchSampler(SequentialSampler(data), self.batch_size, False), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
