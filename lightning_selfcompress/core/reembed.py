"""Re-embedding a residual branch whose channels were removed from that branch alone.

A channel can leave one branch of a residual add while the stream it is added to keeps it (the paper treats
branches separately). The branch's last module then emits fewer channels than the stream carries; a forward hook
on it puts them back at their places, zeros where channels went, so the add sees the width it always saw. The
channels removed carried exactly zero (that is the rule that removed them), so the function is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReEmbedding", "reembedding_of", "set_reembedding"]

class ReEmbedding:
    """Forward hook: output channel i goes to position `index[i]` of a `width`-channel tensor, zeros elsewhere.
    Written as a pad and a gather (ONNX Pad and Gather), which every exporter and runtime follows."""

    def __init__(self, index: Tensor, width: int) -> None:
        self.index, self.width = index, width

    @property
    def index(self) -> Tensor:
        return self._index

    @index.setter
    def index(self, index: Tensor) -> None:
        self._index = index.cpu()
        self._gather: Tensor | None = None

    def __call__(self, module: nn.Module, args: object, output: Tensor) -> Tensor:
        if self._gather is None or self._gather.device != output.device:
            gather = torch.full((self.width,), len(self._index), dtype=torch.long)  # the zero channel
            gather[self._index] = torch.arange(len(self._index))
            self._gather = gather.to(output.device)
        padded = F.pad(output, [0, 0] * (output.dim() - 2) + [0, 1])  # one channel of zeros at the end
        return padded.index_select(1, self._gather)

    def channel_map(self, channels: tuple) -> tuple:
        """The same re-embedding on a per-channel description (size accounting): absent channels have no source."""
        full = [frozenset()] * self.width
        for position, value in zip(self.index.tolist(), channels, strict=True):
            full[position] = value
        return tuple(full)


def reembedding_of(module: nn.Module) -> ReEmbedding | None:
    return next((h for h in module._forward_hooks.values() if isinstance(h, ReEmbedding)), None)


def set_reembedding(module: nn.Module, index: Tensor | None, width: int) -> None:
    """Install, update or (index None: nothing to re-embed) remove the module's re-embedding hook. Found by type
    among the module's hooks, so a deep copy of the module carries its own."""
    for key, hook in list(module._forward_hooks.items()):
        if isinstance(hook, ReEmbedding):
            if index is None:
                del module._forward_hooks[key]
            else:
                hook.index, hook.width = index, width
            return
    if index is not None:
        module.register_forward_hook(ReEmbedding(index, width))
