"""Shared fixtures: small real Fashion-MNIST data and quick Trainer settings."""

from __future__ import annotations

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
