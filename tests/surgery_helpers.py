"""Shared by the surgery tests: a small model with every coupling kind."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn



class SmallNet(nn.Module):
    """Conv-BN-ReLU stem, a residual branch (coupled producers), a conv with a bias, pooling and a flatten into a
    Linear. (No bias right before a BatchNorm: its gradient is round-off noise there, which Adam would amplify.)"""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.branch = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.mid = nn.Conv2d(width, 2 * width, 1)
        self.head = nn.Linear(2 * width * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.branch(x)
        x = F.relu(self.mid(x))
        return self.head(F.adaptive_avg_pool2d(x, 2).flatten(1))


def freeze_statistics(net: nn.Module) -> None:
    """Train-mode forwards stop updating running statistics, so that eval-mode outputs before and after a surgery
    are those of the same network."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
