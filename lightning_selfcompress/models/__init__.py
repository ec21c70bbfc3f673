"""Reference networks the recipes use (plain PyTorch), and the LightningModule that trains them."""

from typing import TYPE_CHECKING

from ..extras import lazy
from .baseline_cnn import BaselineCNN
from .resnet9 import ResNet9

if TYPE_CHECKING:
    from .classifier import ImageClassifier


def __getattr__(name: str):
    return lazy(__name__, {"ImageClassifier": ".classifier"}, name)  # imports Lightning: only when asked for


__all__ = ["BaselineCNN", "ImageClassifier", "ResNet9"]
