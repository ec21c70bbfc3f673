"""Fashion-MNIST as a LightningDataModule, read from IDX files into memory.

Where the data comes from, in order: the directory the user names; the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist); torchvision's download, if `download=True` and a network exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from .batches import ShuffledBatches
from .idx import read_idx

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {"train": "train", "test": "t10k"}
MEAN, STD = 0.2860, 0.3530


def find_idx(directory: Path, split: str, kind: str) -> Path | None:
    stem = f"{SPLITS[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


class FashionMNISTDataModule(pl.LightningDataModule):
    """Train/validation/test loaders over Fashion-MNIST, normalised, as [N, 1, 28, 28] float tensors.

    The last `val_size` training images form the validation set. Batches are sliced from in-memory tensors,
    so loading costs next to nothing. Training batches are shuffled from (`seed`, epoch), so a resumed run sees
    the same batches as an uninterrupted one.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 256,
        val_size: int = 5000,
        download: bool = False,
        cache_dir: str = "~/.cache/lightning_selfcompress",
        limit_train: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1.")
        if not 0 <= val_size < 60000:
            raise ValueError(f"val_size={val_size} must be in [0, 60000).")
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.download = download
        self.cache_dir = Path(os.path.expanduser(cache_dir))
        self.limit_train = limit_train
        self.seed = seed
        self.datasets: dict[str, TensorDataset] = {}

    def resolve_dir(self) -> Path:
        """The directory holding the four IDX files, downloading them if allowed; a clear error otherwise."""
        if self.data_dir is not None:
            directory = Path(os.path.expanduser(self.data_dir))
            missing = [f"{s}-{k}" for s in SPLITS for k in ("images", "labels") if find_idx(directory, s, k) is None]
            if missing:
                raise FileNotFoundError(
                    f"data_dir={str(directory)!r} lacks the Fashion-MNIST IDX files for {missing} "
                    "(expected e.g. train-images-idx3-ubyte.gz). Point data_dir at the folder that holds them."
                )
            return directory
        if find_idx(DEBIAN_DIR, "test", "labels") is not None:
            return DEBIAN_DIR
        torchvision_dir = self.cache_dir / "FashionMNIST" / "raw"
        if find_idx(torchvision_dir, "test", "labels") is None:
            if not self.download:
                raise FileNotFoundError(
                    "Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
                    "pass data_dir=<folder with the IDX files>, or set download=true to fetch it with torchvision."
                )
            from torchvision.datasets import FashionMNIST

            try:
                FashionMNIST(str(self.cache_dir), train=True, download=True)
                FashionMNIST(str(self.cache_dir), train=False, download=True)
            except Exception as error:  # noqa: BLE001 - any network failure gets the same advice
                raise RuntimeError(
                    f"Downloading Fashion-MNIST into {self.cache_dir} failed ({error}). Without a network, install "
                    "`dataset-fashion-mnist` or pass data_dir=<folder with the IDX files>."
                ) from error
        return torchvision_dir

    def _load(self, directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_idx(find_idx(directory, split, "images"))
        labels = read_idx(find_idx(directory, split, "labels")).long()
        if images.ndim != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"Fashion-MNIST {split} files in {directory} disagree: images {tuple(images.shape)}, labels {tuple(labels.shape)}.")
        return ((images.float() / 255 - MEAN) / STD).unsqueeze(1), labels

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        directory = self.resolve_dir()
        x, y = self._load(directory, "train")
        n_train = len(x) - self.val_size
        limit = n_train if self.limit_train is None else min(self.limit_train, n_train)
        self.datasets["train"] = TensorDataset(x[:limit], y[:limit])
        self.datasets["val"] = TensorDataset(x[n_train:], y[n_train:])
        self.datasets["test"] = TensorDataset(*self._load(directory, "test"))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.datasets[split]
        if shuffle:
            batches = ShuffledBatches.for_trainer(len(data), self.batch_size, self.seed, self.trainer)
        else:
            batches = BatchSampler(SequentialSampler(data), self.batch_size, drop_last=False)
        # batch_size=None: the dataset is indexed with a whole batch of indices at once.
        return DataLoader(data, sampler=batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
