"""The ImageNet datamodule on generated JPEGs in the ImageFolder layout: transforms, order, clear errors, a real fit."""

from __future__ import annotations

import shutil

import lightning.pytorch as pl
import pytest
import torch

from conftest import trainer_kwargs, write_imagenet
from lightning_selfcompress.data import ImageNetDataModule
from lightning_selfcompress.models import ImageClassifier, ResNet9


def datamodule(root, **kwargs) -> ImageNetDataModule:
    dm = ImageNetDataModule(str(root), **{"batch_size": 4, "num_workers": 0, "image_size": 32, "resize_size": 36,
                                          **kwargs})  # fmt: skip
    dm.setup()
    return dm


def test_standard_transforms_give_normalised_crops_and_labels_by_folder(tmp_path):
    dm = datamodule(write_imagenet(tmp_path))
    assert dm.classes == [f"n{c:08d}" for c in range(4)] and len(dm.datasets["train"]) == 16
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -2.2 < x.min() < 0 < x.max() < 2.7, "normalised with ImageNet's mean and std"
    val = [b for b in dm.val_dataloader()]
    assert sorted(torch.cat([b[1] for b in val]).tolist()) == [0, 0, 1, 1, 2, 2, 3, 3], "2 per class folder"
    first, second = dm.datasets["val"][0][0], dm.datasets["val"][0][0]
    assert torch.equal(first, second), "evaluation is deterministic (resize, centre crop)"
    assert first.shape == (3, 32, 32) and dm.datasets["val"][0][0].shape[0] == 3, "grayscale JPEGs come out RGB"


def test_training_order_is_drawn_from_seed_and_epoch(tmp_path):
    dm = datamodule(write_imagenet(tmp_path))
    loader = dm.train_dataloader()
    order = list(loader.sampler)
    assert sorted(order) == list(range(16)) and list(loader.sampler) == order
    loader.sampler.set_epoch(1)
    assert list(loader.sampler) != order
    assert list(datamodule(tmp_path).train_dataloader().sampler) == order, "a fresh datamodule repeats it"
    assert len(loader) == 4, "the last incomplete batch is dropped"


def test_missing_and_malformed_folders_say_what_is_expected(tmp_path):
    with pytest.raises(ValueError, match="needs data_dir.*data.data_dir=/path/to/imagenet"):
        ImageNetDataModule(None)
    with pytest.raises(ValueError, match="resize_size=16 must be an integer >= image_size=32"):
        ImageNetDataModule(str(tmp_path), image_size=32, resize_size=16)
    with pytest.raises(FileNotFoundError, match="does not exist: point it at the folder holding ImageNet's train/"):
        datamodule(tmp_path / "absent")
    root = write_imagenet(tmp_path / "a")
    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match=r"val folder .*/a/val' does not exist \(expected .*/val/<wnid>/"):
        datamodule(root)
    (root / "val").mkdir()
    shutil.copy(next((root / "train" / "n00000001").iterdir()), root / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(FileNotFoundError, match="holds images but no class folders .*valprep.sh"):
        datamodule(root)
    root = write_imagenet(tmp_path / "b")
    shutil.rmtree(root / "val" / "n00000002")
    with pytest.raises(ValueError, match=r"different class folders \(only in train: \['n00000002'\], only in val"):
        datamodule(root)
    root = write_imagenet(tmp_path / "c")
    for image in (root / "train" / "n00000003").iterdir():
        image.rename(image.with_suffix(".txt"))
    with pytest.raises(FileNotFoundError, match="train folder .*Found no valid file for the classes n00000003"):
        datamodule(root)


def test_a_real_lightning_fit_with_worker_processes(tmp_path):
    dm = datamodule(write_imagenet(tmp_path), num_workers=2)
    pl.seed_everything(0, workers=True, verbose=False)
    module = ImageClassifier(ResNet9(in_channels=3, num_classes=4, width=8), num_classes=4, lr=0.01)
    before = module.net.linear.weight.detach().clone()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, limit_val_batches=None))
    trainer.fit(module, dm)
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss"])
    (test,) = trainer.test(module, dm, verbose=False)
    correct = test["test/accuracy"] * 8  # of the 4 classes x 2 validation images
    assert abs(correct - round(correct)) < 1e-4 and not torch.equal(before, module.net.linear.weight)
