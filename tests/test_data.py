"""The IDX reader and the Fashion-MNIST datamodule: real files, generated files in the same format, clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import requires_fashion_mnist
from lightning_selfcompress.data import fashion_mnist
from lightning_selfcompress.data.batches import ShuffledBatches
from lightning_selfcompress.data.fashion_mnist import FashionMNISTDataModule
from lightning_selfcompress.data.idx import read_idx


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(data)


def write_fake_fashion_mnist(directory, n_train=40, n_test=12, compress=True) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{stem}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(directory / f"{stem}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, compress)
    assert torch.equal(read_idx(path), torch.from_numpy(array))


def test_idx_rejects_bad_and_truncated_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok", np.zeros((4, 4)), compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "short")


def test_datamodule_reads_a_named_directory(tmp_path):
    write_fake_fashion_mnist(tmp_path, compress=False)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), batch_size=8, val_size=8)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.datasets["train"]) == 32 and len(dm.datasets["val"]) == 8 and len(dm.datasets["test"]) == 12
    assert sum(len(b[0]) for b in dm.test_dataloader()) == 12, "evaluation keeps the last partial batch"


def test_missing_files_in_a_named_directory_are_listed(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks the Fashion-MNIST IDX files for \['test-labels'\]"):
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup()


def test_no_data_anywhere_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    dm = FashionMNISTDataModule(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*download=true"):
        dm.setup()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="batch_size=0"):
        FashionMNISTDataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_size=70000"):
        FashionMNISTDataModule(val_size=70000)


@requires_fashion_mnist
def test_the_real_debian_data():
    dm = FashionMNISTDataModule(batch_size=1000)
    dm.setup()
    assert len(dm.datasets["train"]) == 55000 and len(dm.datasets["val"]) == 5000 and len(dm.datasets["test"]) == 10000
    x, y = dm.datasets["train"][:]
    assert x.shape == (55000, 1, 28, 28) and set(y.unique().tolist()) == set(range(10))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05, "normalised"


def test_each_process_draws_its_slice_of_the_global_batches_one_process_would_draw():
    """What makes N DDP processes train as one process at N times the batch; a DistributedSampler, so Lightning keeps
    it rather than dealing whole batches to ranks in an order of its own."""
    one = ShuffledBatches(100, 8, seed=3)
    ranks = [ShuffledBatches(100, 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for sampler in (one, *ranks):
        sampler.set_epoch(2)
    assert isinstance(ranks[0], DistributedSampler) and len(ranks[0]) == len(one) == 12
    assert [a + b for a, b in zip(*ranks)] == list(one)
    with pytest.raises(ValueError, match="do not fill one batch of 32 on each of 4 process"):
        ShuffledBatches(100, 32, rank=1, world_size=4)
