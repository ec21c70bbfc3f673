"""The small CNN of the tinygrad self-compression notebook, the baseline of the paper's MNIST-scale experiments."""

from __future__ import annotations

from torch import Tensor, nn


class BaselineCNN(nn.Module):
    """convs 1->32 5x5, 32->32 5x5, BN, max-pool, 32->64 3x3, 64->64 3x3, BN, max-pool, 576->10 as a 1x1 conv.

    `width` scales every channel count (32 by default) for tiny tests; the input is 28x28.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width={width} must be >= 1.")
        wide = 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5), nn.ReLU(),
            nn.Conv2d(width, width, 5), nn.ReLU(),
            nn.BatchNorm2d(width), nn.MaxPool2d(2),
            nn.Conv2d(width, wide, 3), nn.ReLU(),
            nn.Conv2d(wide, wide, 3), nn.ReLU(),
            nn.BatchNorm2d(wide), nn.MaxPool2d(2),
        )  # fmt: skip
        self.flat_features = wide * 3 * 3
        self.classifier = nn.Conv2d(self.flat_features, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = x.reshape(x.shape[0], -1, 1, 1)  # -1, not a fixed count: channels may be removed
        return self.classifier(x).flatten(1)
