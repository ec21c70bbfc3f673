"""Re-embedding a residual branch whose channels were removed from that branch alone.

A channel can leave one branch of a residual add while the stream it is added to keeps it (the paper treats
branches separately). The branch's last module then emits fewer channels than the stream carries; a forward hook
on it puts them back at their places, zeros where channels went, so the add sees the width it always saw. The
channels removed carried exactly zero (that is the rule that removed them), so the function is unchanged.

The hook appends one channel of zeros and gathers (ONNX Concat and Gather, which every exporter and runtime follows;
with a Pad, TorchScript's export loses the static height and width that a later adaptive pooling needs).
Its gather index is a non-persistent buffer of the module: it moves with the module between devices, stays out of
the state_dict (the surgery history recreates it), and is fixed between surgeries, so torch.compile guards on it
once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GATHER", "reembed", "reembedding_of", "set_reembedding"]

GATHER = "reembed_gather"  # per stream position: the branch channel it takes, or the zero channel past the last
DIM = "reembed_dim"  # the dimension of the channels (1, or the last of a channels-last output)


def reembed(module: nn.Module, args: object, output: Tensor) -> Tensor:
    """Forward hook: the branch's channels at their stream positions, zeros elsewhere."""
    dim = getattr(module, DIM)
    zeros = torch.zeros_like(output.narrow(dim, 0, 1))
    padded = torch.cat([output, zeros], dim)  # ONNX keeps every other dim's size (Pad did not)
    return padded.index_select(dim, getattr(module, GATHER))


def reembedding_of(module: nn.Module) -> Tensor | None:
    """The module's gather index, if its output is re-embedded."""
    return module._buffers.get(GATHER) if reembed in module._forward_hooks.values() else None


def set_reembedding(module: nn.Module, kept: Tensor | None, device: torch.device | str = "cpu", dim: int = 1) -> None:
    """Re-embed the module's output along `dim`: `kept` says, per stream position, whether the branch still has that
    channel; None (or all kept) removes the re-embedding."""
    hooked = [key for key, hook in module._forward_hooks.items() if hook is reembed]
    if kept is None or kept.all():
        for key in hooked:
            del module._forward_hooks[key]
        module._buffers.pop(GATHER, None)
        module.__dict__.pop(DIM, None)
        return
    gather = torch.full((len(kept),), int(kept.sum()), dtype=torch.long)
    gather[kept] = torch.arange(int(kept.sum()))
    module.register_buffer(GATHER, gather.to(device), persistent=False)
    setattr(module, DIM, dim)
    if not hooked:
        module.register_forward_hook(reembed)

