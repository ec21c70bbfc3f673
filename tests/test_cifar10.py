"""The CIFAR-10 datamodule on generated files in the official python-version format: split, augmentation, exact
repeat per (seed, epoch), clear errors, and a real Lightning fit."""

from __future__ import annotations

import pickle

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from conftest import trainer_kwargs, write_cifar10
from lightning_selfcompress.data import CIFAR10DataModule
from lightning_selfcompress.data.cifar10 import MEAN, STD, random_crop_flip
from lightning_selfcompress.models import ImageClassifier, ResNet9


def datamodule(tmp_path, **kwargs) -> CIFAR10DataModule:
    folder = tmp_path / "cifar-10-batches-py"
    if not folder.exists():
        write_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), **{"batch_size": 8, "val_size": 20, **kwargs})
    dm.setup()
    return dm


def test_splits_are_drawn_from_the_split_seed_and_normalised_per_channel(tmp_path):
    dm = datamodule(tmp_path)
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [80, 20, 20]
    x, y = dm.val_dataloader().dataset[list(range(20))]
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    restored = x * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    assert torch.allclose(restored, dm.datasets["val"].images.float(), atol=1e-3), "(x - mean) / std per channel"
    same, other = datamodule(tmp_path, seed=5), datamodule(tmp_path, split_seed=1)
    assert torch.equal(same.datasets["val"].images, dm.datasets["val"].images), "the training seed keeps the split"
    assert not torch.equal(other.datasets["val"].images, dm.datasets["val"].images)
    everything = torch.cat([dm.datasets["train"].images, dm.datasets["val"].images]).flatten(1)
    assert len(everything.unique(dim=0)) == 100, "train and val are disjoint and cover the 5 batch files"
    assert sum(len(b[0]) for b in dm.test_dataloader()) == 20


def test_a_crop_is_a_window_of_the_zero_padded_image_mirrored_or_not():
    images = torch.randint(1, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(images, 4, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = F.pad(images, (4,) * 4)
    flipped = 0
    for i in range(len(images)):
        crops = {(t, x, f): padded[i, :, t : t + 32, x : x + 32] for t in range(9) for x in range(9) for f in (0, 1)}
        windows = {key for key, crop in crops.items() if torch.equal(out[i], crop.flip(-1) if key[2] else crop)}
        assert windows, f"image {i} is no window of its padded original"
        flipped += all(f for _, _, f in windows)
    assert 0 < flipped < len(images), "some images are mirrored, some not"
    assert (out == 0).any(), "some windows reach into the zero padding"


def test_training_batches_repeat_exactly_from_seed_and_epoch(tmp_path):
    dm = datamodule(tmp_path)
    loader = dm.train_dataloader()
    first = [b[0] for b in loader]
    again = [b[0] for b in loader]
    loader.sampler.set_epoch(1)
    next_epoch = [b[0] for b in loader]
    fresh = [b[0] for b in datamodule(tmp_path).train_dataloader()]
    assert len(first) == 10 and all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(first, fresh)), "a fresh datamodule (a resumed run) repeats them"
    assert not any(torch.equal(a, b) for a, b in zip(first, next_epoch))
    plain = [b[0] for b in datamodule(tmp_path, augment=False).train_dataloader()]
    assert not any(torch.equal(a, b) for a, b in zip(first, plain)), "augmentation changed the images"


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: point it at cifar-10-batches-py/"):
        CIFAR10DataModule(data_dir=str(tmp_path / "absent")).setup()
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['data_batch_3'\]"):
        CIFAR10DataModule(data_dir=str(folder)).setup()
    pixels = lambda n, width: torch.zeros(n, width, dtype=torch.uint8).numpy()  # noqa: E731
    for content, message in [
        (b"not a pickle", "not a CIFAR-10 batch file \\(unpickling failed"),
        (pickle.dumps({b"images": 1}), "expected a dict with b'data' and b'labels'"),
        (pickle.dumps({b"data": pixels(4, 1024), b"labels": [0] * 4}), "uint8 \\[N, 3072\\]"),
        (pickle.dumps({b"data": pixels(2, 3072), b"labels": [0, 10]}), "labels must lie in 0..9"),
    ]:
        (folder / "data_batch_3").write_bytes(content)
        with pytest.raises(ValueError, match=f"data_batch_3 .*{message}"):
            CIFAR10DataModule(data_dir=str(tmp_path)).setup()


def test_no_data_and_no_download_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="Pass data_dir=.* or set download=true"):
        CIFAR10DataModule(cache_dir=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="val_size=50000"):
        CIFAR10DataModule(val_size=50000)
    with pytest.raises(ValueError, match="limit_train=0"):
        CIFAR10DataModule(limit_train=0)


def test_a_real_lightning_fit_on_it(tmp_path):
    dm = datamodule(tmp_path)
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(ResNet9(in_channels=3, num_classes=10, width=8), lr=0.01)
    before = module.net.linear.weight.detach().clone()
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=4, limit_val_batches=None, val_check_interval=2))
    trainer.fit(module, dm)
    assert trainer.global_step == 4 and torch.isfinite(trainer.callback_metrics["train/loss"])
    correct = trainer.callback_metrics["val/accuracy"].item() * 20  # of the 20 validation images
    assert abs(correct - round(correct)) < 1e-4, "a whole number of the validation images"
    assert not torch.equal(before, module.net.linear.weight), "it trained"
