"""ImageNet (ILSVRC-2012) as a LightningDataModule over torchvision's ImageFolder, with the standard transforms.

Layout: `<data_dir>/train/<wnid>/*.JPEG` and `<data_dir>/val/<wnid>/*.JPEG`, one folder per class (the validation
images sorted into class folders, as PyTorch's ImageNet example expects). The labels are the sorted folder names'
positions, so train and val must hold the same class folders. ImageNet's test labels are not public: `test` runs on
val.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from .batches import ShuffledOrder

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = ("train", "val")


def train_transform(image_size: int) -> v2.Compose:
    return v2.Compose([
        v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *_to_normalised_tensor(),
    ])  # fmt: skip


def eval_transform(image_size: int, resize_size: int) -> v2.Compose:
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size), *_to_normalised_tensor()])


def _to_normalised_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]


def open_split(root: Path, split: str, transform: v2.Compose) -> ImageFolder:
    """ImageFolder over `root/split`, with an error that says what the folder should look like."""
    directory = root / split
    expected = f"expected {directory}/<wnid>/<image>.JPEG, one folder per class"
    if not directory.is_dir():
        raise FileNotFoundError(f"ImageNet's {split} folder {str(directory)!r} does not exist ({expected}).")
    entries = list(directory.iterdir())
    if not any(e.is_dir() for e in entries) and any(e.name.lower().endswith(IMG_EXTENSIONS) for e in entries):
        raise FileNotFoundError(
            f"{str(directory)!r} holds images but no class folders ({expected}). ImageNet's validation images ship "
            "in one folder: sort them into val/<wnid>/ with the devkit's ground truth (e.g. PyTorch's valprep.sh)."
        )
    try:
        return ImageFolder(str(directory), transform=transform)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"ImageNet's {split} folder {str(directory)!r}: {error} ({expected}).") from error


class ImageNetDataModule(pl.LightningDataModule):
    """Train and validation loaders over ImageNet in its ImageFolder layout, decoded by `num_workers` processes.

    Train: RandomResizedCrop(`image_size`) and a horizontal flip; val: Resize(`resize_size`) and CenterCrop
    (`image_size`); both normalised with ImageNet's mean and standard deviation. The training order is drawn from
    (`seed`, epoch), so a run resumed at an epoch boundary sees the same order; the augmentation draws do not come
    back (persistent workers are seeded once per run, so a resumed run draws crops and flips anew). Under DDP
    Lightning's DistributedSampler orders by the global seed instead. `batch_size` is per process.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        resize_size: int = 256,
        pin_memory: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if data_dir is None:
            raise ValueError(
                "ImageNetDataModule needs data_dir, the folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
                "(with lsc-train: data.data_dir=/path/to/imagenet)."
            )
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("image_size", image_size, 1)):  # fmt: skip
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}.")
        if not isinstance(resize_size, int) or resize_size < image_size:
            raise ValueError(f"resize_size={resize_size!r} must be an integer >= image_size={image_size}.")
        self.data_dir = Path(os.path.expanduser(data_dir))
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.image_size, self.resize_size = image_size, resize_size
        self.datasets: dict[str, ImageFolder] = {}

    @property
    def classes(self) -> list[str]:
        return self.datasets["train"].classes

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if not self.data_dir.is_dir():
            raise FileNotFoundError(
                f"data_dir={str(self.data_dir)!r} does not exist: point it at the folder holding ImageNet's train/ "
                "and val/ folders."
            )
        train = open_split(self.data_dir, "train", train_transform(self.image_size))
        val = open_split(self.data_dir, "val", eval_transform(self.image_size, self.resize_size))
        if train.classes != val.classes:
            only_train = sorted(set(train.classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(train.classes))
            raise ValueError(
                f"train/ and val/ in {self.data_dir} hold different class folders (only in train: {only_train[:5]}, "
                f"only in val: {only_val[:5]}): labels are the sorted folders' positions, so both need the same."
            )
        self.datasets = {"train": train, "val": val}

    def _loader(self, data: ImageFolder, **kwargs) -> DataLoader:
        pin = self.pin_memory and torch.cuda.is_available()
        return DataLoader(data, batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=pin,
                          persistent_workers=self.num_workers > 0, **kwargs)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        data = self.datasets["train"]
        if len(data) < self.batch_size:
            raise ValueError(
                f"{len(data)} training images do not fill one batch of {self.batch_size}; lower batch_size."
            )
        return self._loader(data, sampler=ShuffledOrder(data, self.seed), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"])

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"])
