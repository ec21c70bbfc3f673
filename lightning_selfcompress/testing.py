"""Helpers for tests and benchmarks of channel surgery: pick channel groups at random and make them dead, the way
self-compression leaves them (bit depth 0, constant output zero)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .core.groups import ChannelGraph, Cuts

__all__ = [
    "choose_branch_channels", "choose_groups", "kill_branch_channels", "kill_groups", "randomize_zero_weights",
    "removable_groups",
]  # fmt: skip


@torch.no_grad()
def randomize_zero_weights(net: nn.Module, std: float = 0.02) -> None:
    """Weights initialised to zeros (ViT's head, its class token) make every output the same before and after a
    cut, which would hide any difference: give them random values."""
    for p in net.parameters():
        if p.dim() > 1 and not p.any():
            p.normal_(0, std)


def _cuts(model: ChannelGraph | Cuts) -> Cuts:
    """The model as a surgeon left it (its `cuts`), or as traced (a graph)."""
    return model if isinstance(model, Cuts) else Cuts(model)


def removable_groups(model: ChannelGraph | Cuts) -> Tensor:
    """Groups that have a producer, are not pinned and are still there."""
    cuts = _cuts(model)
    graph = cuts.graph
    has_producer = torch.zeros(graph.num_groups, dtype=torch.bool)
    for groups in graph.outputs.values():
        has_producer[groups] = True
    return has_producer & ~graph.pinned_mask & ~cuts.removed


def choose_groups(model: ChannelGraph | Cuts, fraction: float, seed: int = 0) -> Tensor:
    """A random `fraction` of the removable groups, as a mask over all groups."""
    graph = _cuts(model).graph
    candidates = removable_groups(model).nonzero().flatten()
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(graph.num_groups, dtype=torch.bool)
    mask[candidates[order[: int(fraction * len(candidates))]]] = True
    return mask


@torch.no_grad()
def kill_groups(model: ChannelGraph | Cuts, mask: Tensor, bits: bool = True) -> None:
    """Make the chosen groups emit exact zeros: producer bit depths (`bits=True`, quantized layers) or weights set to
    0, producer biases 0, and the shift and running mean of every per-channel module they pass through 0."""
    cuts = _cuts(model)
    for role in ("outputs", "members"):
        for name, groups in getattr(cuts.graph, role).items():
            _kill(cuts.graph.model.get_submodule(name), role, mask[groups[cuts.present(name, role)]], bits)


def choose_branch_channels(
    model: ChannelGraph | Cuts, fraction: float, seed: int = 0, spare: Tensor | None = None
) -> dict[str, Tensor]:
    """Per residual branch, a random `fraction` of its channels still there (and not in the groups `spare`), to
    remove from that branch alone; as masks over the producer's original positions."""
    now = _cuts(model)
    generator = torch.Generator().manual_seed(seed)
    cuts = {}
    for producer in now.graph.branches:
        groups = now.graph.outputs[producer]
        candidates = (now.present(producer, "outputs") & ~(spare[groups] if spare is not None else False)).nonzero()
        chosen = candidates.flatten()[torch.randperm(len(candidates), generator=generator)[: int(fraction * len(candidates))]]
        if len(chosen) and len(chosen) < len(candidates):
            cuts[producer] = torch.zeros(len(groups), dtype=torch.bool)
            cuts[producer][chosen] = True
    return cuts


@torch.no_grad()
def kill_branch_channels(model: ChannelGraph | Cuts, cuts: dict[str, Tensor], bits: bool = True) -> None:
    """Make the chosen channels of each branch add exact zeros: as `kill_groups`, on the branch's own modules."""
    now = _cuts(model)
    for producer, cut in cuts.items():
        for name, role in ((producer, "outputs"), *((m, "members") for m in now.graph.branches[producer].members)):
            _kill(now.graph.model.get_submodule(name), role, cut[now.present(name, role)], bits)


def _kill(module: nn.Module, role: str, where: Tensor, bits: bool) -> None:
    tensors = [module.weight_quantizer.bits if bits else module.weight] if role == "outputs" else []
    tensors += [t for t in (getattr(module, "bias", None), getattr(module, "running_mean", None)) if t is not None]
    for tensor in tensors:
        tensor[where.to(tensor.device)] = 0.0
