"""The ops and modules both channel tracers know, in one place (rules for one's own blocks: core/rules.py).

The strict graph of surgery (groups.py) and the lenient map of size accounting (graph.py) read these same tables,
each in its own way: surgery follows the constant a dead channel carries through them, size accounting only which
producers feed each channel. A module with a registered rule, and every Conv/Linear, stays whole in the trace.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .rules import rule_of

PRODUCERS = (_ConvNd, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
)  # fmt: skip
CONSTANT_PRESERVING_MODULES = (  # a constant channel stays the same constant
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
)  # fmt: skip
ACTIVATION_OPS = {
    "relu", "relu_", "relu6", "gelu", "silu", "mish", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "softplus", "clamp", "clamp_min", "clamp_max", "neg",
}  # fmt: skip
CONSTANT_PRESERVING_OPS = {
    "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate",
}  # fmt: skip
VALUE_OPS = {"contiguous", "clone", "float", "to", "type_as", "detach"}  # every value kept where it is
AVG_POOL_OPS = {"avg_pool1d", "avg_pool2d", "avg_pool3d"}  # padding may be counted: only zeros stay exact
# the identity in eval mode; in train mode each sample (or channel) is zeroed or scaled: only a zero stays constant
DROPOUT_OPS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "stochastic_depth"}  # torchvision.ops
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

# For the lenient map: the ops and modules that keep every channel in its place (a GroupNorm only with one channel
# per group: else it mixes them, see graph.py), and the layout ops it follows when they flatten from dim 1.
CHANNELWISE_OPS = ACTIVATION_OPS | DROPOUT_OPS | VALUE_OPS | CONSTANT_PRESERVING_OPS | AVG_POOL_OPS
CHANNELWISE_MODULES = (
    *NORMS, *ACTIVATION_MODULES, *CONSTANT_PRESERVING_MODULES, nn.modules.pooling._AvgPoolNd,
    nn.modules.dropout._DropoutNd, nn.Identity,
)  # fmt: skip
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
