"""Shared fixtures: small real Fashion-MNIST data and quick Trainer settings."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from lightning_selfcompress.data.fashion_mnist import DEBIAN_DIR, FashionMNISTDataModule, find_idx

warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def fashion_mnist_available() -> bool:
    return find_idx(DEBIAN_DIR, "test", "labels") is not None


requires_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason=f"Fashion-MNIST is not at {DEBIAN_DIR}: run `apt-get install dataset-fashion-mnist` (bash .ci/install does)",
)


@pytest.fixture
def tiny_fmnist() -> FashionMNISTDataModule:
    """The real Fashion-MNIST, 512 training images, batches of 32."""
    if not fashion_mnist_available():
        pytest.skip(f"Fashion-MNIST is not at {DEBIAN_DIR}: run `apt-get install dataset-fashion-mnist`")
    return FashionMNISTDataModule(batch_size=32, val_size=256, limit_train=512)


def trainer_kwargs(tmp_path: Path, **overrides) -> dict:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _latency_cache(tmp_path_factory) -> None:
    """Latency tables measured by tests go to a folder of their own, not the user's cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


def sgd_steps(model: torch.nn.Module, sample_shape: tuple[int, ...], steps: int = 2, lr: float = 0.01,
              batch: int = 8) -> None:
    """A few plain SGD steps on random images and labels of 10 classes: the int8 steps start and move."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = torch.randn(batch, *sample_shape), torch.randint(0, 10, (batch,))
        torch.nn.functional.cross_entropy(model.train()(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def optimized_graph(path, tmp_path: Path):
    """The graph ONNX Runtime runs from the file at `path`, default session options (an `onnx.GraphProto`)."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


def write_cifar10(directory: Path, per_batch: int = 20, test: int = 20) -> Path:
    """CIFAR-10's python version, in its exact format (pickled dicts with bytes keys), filled with random images:
    returns the `cifar-10-batches-py` folder inside `directory`."""
    import pickle

    import numpy as np

    folder = directory / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        entry = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    return folder


def write_imagenet(directory: Path, classes: int = 4, train: int = 4, val: int = 2) -> Path:
    """ImageNet's ImageFolder layout, train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, with random JPEGs of varied sizes
    (one grayscale, as a few of ImageNet's are); returns `directory`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = directory / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = int(rng.integers(40, 72)), int(rng.integers(40, 72))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                image = Image.fromarray(pixels).convert("L" if (c, i) == (0, 0) else "RGB")
                image.save(folder / f"n{c:08d}_{split}_{i}.JPEG", quality=90)
    return directory
