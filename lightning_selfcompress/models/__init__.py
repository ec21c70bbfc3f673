"""Reference networks the recipes use."""

from .baseline_cnn import BaselineCNN
from .classifier import ImageClassifier
from .resnet9 import ResNet9

__all__ = ["BaselineCNN", "ImageClassifier", "ResNet9"]
