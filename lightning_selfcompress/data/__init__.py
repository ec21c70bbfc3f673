"""Datamodules the recipes use."""

from .cifar10 import CIFAR10DataModule
from .fashion_mnist import FashionMNISTDataModule
from .imagenet import ImageNetDataModule

__all__ = ["CIFAR10DataModule", "FashionMNISTDataModule", "ImageNetDataModule"]
