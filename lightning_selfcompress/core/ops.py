"""The layers and the channel-moving ops the channel walker handles itself, in one place (activations,
poolings, dropouts and blocks of one's own are rules: core/rules.py).

The channel walker (groups.py) reads them, strict for surgery and lenient for size accounting. A module with a rule,
and every Conv/Linear, stays whole in the trace.
"""

from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn.functional as F
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
# Max pooling commutes with every non-decreasing map (rounding to a step, a ReLU): the maxima of the mapped values are
# the mapped maxima
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
MAX_POOL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
)  # fmt: skip
NON_TENSOR_OPS = {"size", "dim", "numel", "getattr"}
MOVES = {
    "view", "reshape", "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "flatten", "contiguous",
    "clone", "squeeze", "unsqueeze",
}  # fmt: skip


def one_channel_per_group(module: nn.Module) -> bool:
    """A GroupNorm with one channel per group normalises each channel alone; with more it mixes them."""
    return isinstance(module, nn.GroupNorm) and module.num_groups == module.num_channels


class LeafTracer(fx.Tracer):
    """Keeps Conv/Linear layers and modules with a registered rule whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PRODUCERS) or rule_of(m) is not None or super().is_leaf_module(m, qualname)


def leaf_trace(model: nn.Module) -> fx.Graph | None:
    """`model`'s graph by `LeafTracer`, for what a trace can add (shared steps, residual steps, functional weights);
    None where torch.fx cannot trace it, which then goes without."""
    try:
        return LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: what the trace finds is an optimisation, not a requirement
        return None


def node_is(
    node: fx.Node, modules: dict[str, nn.Module], types: tuple, functions: tuple = (), methods: tuple = ()
) -> bool:
    """Whether the traced `node` calls a module of one of `types`, one of `functions` or a method named in `methods`."""
    if node.op == "call_module":
        return isinstance(modules[node.target], types)
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


def op_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def weights_read_directly(graph: fx.Graph) -> list[str]:
    """The modules whose weight the model reads itself rather than by calling them (Swin's attention passes
    `qkv.weight` to a function): a quantizer on them would not act."""
    weights = [str(n.target) for n in graph.nodes if n.op == "get_attr" and str(n.target).endswith(".weight")]
    return list(dict.fromkeys(target.rpartition(".")[0] for target in weights))
