"""Helpers for tests and benchmarks of channel surgery: pick channel groups at random and make them dead, the way
self-compression leaves them (bit depth 0, constant output zero)."""

from __future__ import annotations

import torch
from torch import Tensor

from .core.groups import ChannelGraph

__all__ = ["choose_groups", "kill_groups", "removable_groups"]


def removable_groups(graph: ChannelGraph) -> Tensor:
    """Groups that have a producer, are not pinned and are still there."""
    has_producer = torch.zeros(graph.num_groups, dtype=torch.bool)
    for groups in graph.outputs.values():
        has_producer[groups] = True
    return has_producer & ~graph.pinned_mask & ~graph.removed


def choose_groups(graph: ChannelGraph, fraction: float, seed: int = 0) -> Tensor:
    """A random `fraction` of the removable groups, as a mask over all groups."""
    candidates = removable_groups(graph).nonzero().flatten()
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(graph.num_groups, dtype=torch.bool)
    mask[candidates[order[: int(fraction * len(candidates))]]] = True
    return mask


@torch.no_grad()
def kill_groups(graph: ChannelGraph, mask: Tensor, bits: bool = True) -> None:
    """Make the chosen groups emit exact zeros: producer bit depths (`bits=True`, quantized layers) or weights set to
    0, producer biases 0, and the shift and running mean of every per-channel module they pass through 0."""
    model = graph.model
    for name, groups in graph.outputs.items():
        module = model.get_submodule(name)
        where = mask[groups[~graph.removed[groups]]].to(module.weight.device)
        if bits:
            module.weight_quantizer.bits[where] = 0.0
        else:
            module.weight[where] = 0.0
        if module.bias is not None:
            module.bias[where] = 0.0
    for name, groups in graph.members.items():
        module = model.get_submodule(name)
        for attr in ("bias", "running_mean"):
            tensor = getattr(module, attr, None)
            if tensor is not None:
                tensor[mask[groups[~graph.removed[groups]]].to(tensor.device)] = 0.0
