"""Datamodules the recipes use (Lightning's), over plain readers (`idx`) that need no Lightning."""

from typing import TYPE_CHECKING

from ..extras import lazy

if TYPE_CHECKING:
    from .cifar10 import CIFAR10DataModule
    from .fashion_mnist import FashionMNISTDataModule
    from .imagenet import ImageNetDataModule

_MODULES = {
    "CIFAR10DataModule": ".cifar10",
    "FashionMNISTDataModule": ".fashion_mnist",
    "ImageNetDataModule": ".imagenet",
}


def __getattr__(name: str):
    return lazy(__name__, _MODULES, name)


__all__ = ["CIFAR10DataModule", "FashionMNISTDataModule", "ImageNetDataModule"]
