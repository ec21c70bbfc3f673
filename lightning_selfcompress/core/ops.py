"""The layers and the channel-moving ops both channel tracers handle themselves, in one place (activations,
poolings, dropouts and blocks of one's own are rules: core/rules.py).

The strict graph of surgery (groups.py) and the lenient map of size accounting (graph.py) read these same tables,
each in its own way: surgery follows the constant a dead channel carries through them, size accounting only which
producers feed each channel. A module with a rule, and every Conv/Linear, stays whole in the trace.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .rules import rule_of

PRODUCERS = (_ConvNd, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
ELEMENTWISE = {
    "add": operator.add, "iadd": operator.add, "add_": operator.add, "sub": operator.sub, "isub": operator.sub,
    "mul": operator.mul, "imul": operator.mul, "mul_": operator.mul, "truediv": operator.truediv,
    "div": operator.truediv,
}  # fmt: skip
# Ops that move values without mixing channels: followed exactly by running them on a tensor of channel ids.
LAYOUT_OPS = {
    "flatten", "view", "reshape", "squeeze", "unsqueeze", "getitem", "split", "chunk", "mean", "amax", "amin",
    "expand", "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis",
}  # fmt: skip
NON_TENSOR_OPS = {"size", "dim", "numel", "getattr"}
MOVES = {
    "view", "reshape", "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "flatten", "contiguous",
    "clone", "squeeze", "unsqueeze",
}  # fmt: skip
# For the lenient map: the modules without a rule that keep every channel in its place (a GroupNorm only with one
# channel per group: else it mixes them, see graph.py), and the layout ops it follows when they flatten from dim 1.
PER_CHANNEL_MODULES = (*NORMS, nn.PReLU, nn.modules.pooling._AvgPoolNd)
FLATTENING_OPS = {"flatten", "view", "reshape"}


def one_channel_per_group(module: nn.Module) -> bool:
    """A GroupNorm with one channel per group normalises each channel alone; with more it mixes them."""
    return isinstance(module, nn.GroupNorm) and module.num_groups == module.num_channels


class LeafTracer(fx.Tracer):
    """Keeps Conv/Linear layers and modules with a registered rule whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PRODUCERS) or rule_of(m) is not None or super().is_leaf_module(m, qualname)


def op_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))
