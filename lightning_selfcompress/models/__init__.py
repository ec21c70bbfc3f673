"""Reference networks the recipes use (plain PyTorch), and the LightningModule that trains them."""

from importlib import import_module
from typing import TYPE_CHECKING

from .baseline_cnn import BaselineCNN
from .resnet9 import ResNet9

if TYPE_CHECKING:
    from .classifier import ImageClassifier


def __getattr__(name: str):
    if name == "ImageClassifier":  # imports Lightning: only when asked for
        return import_module(".classifier", __name__).ImageClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BaselineCNN", "ImageClassifier", "ResNet9"]
