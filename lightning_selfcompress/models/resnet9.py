"""Page's DAWNBench ResNet-9 ("How to train your ResNet"), the paper's CIFAR-10 network."""

from __future__ import annotations

from torch import Tensor, nn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.res1 = conv_bn(channels, channels)
        self.res2 = conv_bn(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res2(self.res1(x))


class ResNet9(nn.Module):
    """prep 64, layer1 128 + residual, layer2 256, layer3 512 + residual, max-pool, linear 512->10 scaled 0.125.

    `width` is the prep layer's channel count (64 by default); every other layer scales with it.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64, scale: float = 0.125) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width={width} must be >= 1.")
        w = width
        self.prep = conv_bn(in_channels, w)
        self.layer1 = nn.Sequential(conv_bn(w, 2 * w), nn.MaxPool2d(2), Residual(2 * w))
        self.layer2 = nn.Sequential(conv_bn(2 * w, 4 * w), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn(4 * w, 8 * w), nn.MaxPool2d(2), Residual(8 * w))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.linear = nn.Linear(8 * w, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.linear(self.pool(x).flatten(1)) * self.scale
