"""Shared by the surgery tests: a small model with every coupling kind, and 'killing' channel groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_selfcompress.core.groups import ChannelGraph


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


def removable_groups(graph: ChannelGraph) -> Tensor:
    """Groups with a producer that are not pinned."""
    has_producer = torch.zeros(graph.num_groups, dtype=torch.bool)
    for groups in graph.outputs.values():
        has_producer[groups] = True
    return has_producer & ~graph.pinned_mask & ~graph.removed


def choose(graph: ChannelGraph, fraction: float, seed: int = 0) -> Tensor:
    """A random `fraction` of the removable groups, as a mask."""
    candidates = removable_groups(graph).nonzero().flatten()
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(graph.num_groups, dtype=torch.bool)
    mask[candidates[order[: int(fraction * len(candidates))]]] = True
    return mask


@torch.no_grad()
def hold_at_zero(graph: ChannelGraph, mask: Tensor, bits: bool = False) -> None:
    """Make the chosen groups emit exact zeros everywhere: producer weights (or bit depths) and biases, and the
    shift and running mean of every per-channel module they pass through."""
    model = graph.model
    for name, groups in graph.outputs.items():
        module, where = model.get_submodule(name), mask[groups[~graph.removed[groups]]]
        if bits:
            module.weight_quantizer.bits[where] = 0.0
        else:
            module.weight[where] = 0.0
        if module.bias is not None:
            module.bias[where] = 0.0
    for name, groups in graph.members.items():
        module, where = model.get_submodule(name), mask[groups[~graph.removed[groups]]]
        if getattr(module, "bias", None) is not None:
            module.bias[where] = 0.0
        if getattr(module, "running_mean", None) is not None:
            module.running_mean[where] = 0.0


def freeze_statistics(net: nn.Module) -> None:
    """Train-mode forwards stop updating running statistics, so that eval-mode outputs before and after a surgery
    are those of the same network."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
