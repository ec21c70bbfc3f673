"""Datamodules the recipes use (Lightning's), over plain readers (`idx`) that need no Lightning."""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cifar10 import CIFAR10DataModule
    from .fashion_mnist import FashionMNISTDataModule
    from .imagenet import ImageNetDataModule

_MODULES = {"CIFAR10DataModule": ".cifar10", "FashionMNISTDataModule": ".fashion_mnist", "ImageNetDataModule": ".imagenet"}


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(import_module(_MODULES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_MODULES)
