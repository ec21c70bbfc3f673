"""Datamodules the recipes use."""

from .fashion_mnist import FashionMNISTDataModule

__all__ = ["FashionMNISTDataModule"]
