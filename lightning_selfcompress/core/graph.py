"""Which producer channels feed each input channel of every Conv/Linear layer, traced once with torch.fx.

This is the lenient map that size accounting needs: an input channel whose producers are all at 0 bits carries
a constant, so the consumer's weights for it can be dropped (the paper's refinement). Where the tracer cannot
follow a tensor (a model that does not trace, an op it does not know), the consumer's inputs count as live: the
size is then overestimated, never underestimated.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .ops import (
    ELEMENTWISE,
    FLATTENING_OPS,
    NON_TENSOR_OPS,
    PER_CHANNEL_MODULES,
    PRODUCERS,
    LeafTracer,
    one_channel_per_group,
    op_name,
)
from .reembed import channel_map, reembedding_of
from .rules import Rule, rule_of

__all__ = ["ChannelMap", "input_sources"]

Source = tuple[str, int]  # (producer layer name, output channel)
ChannelMap = tuple[frozenset[Source], ...]  # the producers of each channel of a tensor


@dataclass(frozen=True)
class _Flat:
    """A channel map flattened channel-major into one dimension (`x.flatten(1)`, `x.view(n, -1)`)."""

    channels: ChannelMap


_NOT_A_TENSOR = object()
def _merge(values: list) -> ChannelMap | _Flat | None:
    """Channel-wise union for elementwise ops; a channel is live if any operand's channel is."""
    if not values or any(v is None for v in values):
        return None
    kinds = {type(v) for v in values}
    maps = [v.channels if isinstance(v, _Flat) else v for v in values]
    if len(kinds) != 1 or len({len(m) for m in maps}) != 1:
        return None  # broadcasting across a channel dimension we cannot see
    merged = tuple(frozenset().union(*channel) for channel in zip(*maps))
    return _Flat(merged) if kinds == {_Flat} else merged


def _as_inputs(value, in_features: int) -> ChannelMap | None:
    """The producers of each input feature of a consumer with `in_features` inputs."""
    if isinstance(value, tuple) and len(value) == in_features:
        return value
    if isinstance(value, _Flat) and value.channels and in_features % len(value.channels) == 0:
        per_channel = in_features // len(value.channels)
        return tuple(c for c in value.channels for _ in range(per_channel))
    return None


def input_sources(model: nn.Module) -> dict[str, ChannelMap | None]:
    """For every Conv/Linear layer (by qualified name): the producers of each of its input channels.

    `None` means the layer's inputs could not be followed and count as live.
    """
    try:
        graph = LeafTracer().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure only disables the refinement
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {error}); size accounting "
            "counts every input channel as live, so the reported size is an upper bound.",
            stacklevel=2,
        )
        return {name: None for name, m in model.named_modules() if isinstance(m, PRODUCERS)}

    _check_weights_go_through_forward(model, graph)
    env: dict[fx.Node, object] = {}
    sources: dict[str, ChannelMap | None] = {}

    def value(arg: object) -> object:
        return env.get(arg, _NOT_A_TENSOR) if isinstance(arg, fx.Node) else _NOT_A_TENSOR

    for node in graph.nodes:
        args = [value(a) for a in node.args]
        tensors = [a for a in args if a is not _NOT_A_TENSOR]
        first = args[0] if args else None
        name = op_name(node)
        if node.op == "placeholder":
            env[node] = None
        elif node.op == "call_module":
            module = model.get_submodule(node.target)
            if isinstance(module, PRODUCERS):
                in_features = module.in_channels if isinstance(module, _ConvNd) else module.in_features
                inputs = _as_inputs(first, in_features)
                if node.target in sources and sources[node.target] != inputs:  # a layer called twice
                    inputs = _merge([sources[node.target], inputs])
                sources[node.target] = inputs
                out_features = module.out_channels if isinstance(module, _ConvNd) else module.out_features
                env[node] = tuple(frozenset({(node.target, i)}) for i in range(out_features))
            elif (rule := rule_of(module)) is not None:
                env[node] = None if rule in (Rule.MIXES_CHANNELS, Rule.OPAQUE) else first
            elif isinstance(module, nn.Flatten) and module.start_dim == 1:
                env[node] = _flatten(first)
            elif isinstance(module, PER_CHANNEL_MODULES) or one_channel_per_group(module):
                env[node] = first
            else:
                env[node] = None
            gather = reembedding_of(module)
            if gather is not None and isinstance(env[node], tuple):
                env[node] = channel_map(gather, env[node])
        elif node.op in ("call_function", "call_method"):
            if (rule := rule_of(node.target)) is not None:
                env[node] = None if rule in (Rule.MIXES_CHANNELS, Rule.OPAQUE) else first
            elif name in NON_TENSOR_OPS or (node.target is operator.getitem and first is _NOT_A_TENSOR):
                env[node] = _NOT_A_TENSOR
            elif name in FLATTENING_OPS and _flattens_from_dim1(node):
                env[node] = _flatten(first)
            elif name == "cat" and _cat_dim(node) == 1 and all(isinstance(t, tuple) for t in _cat_inputs(node, env)):
                env[node] = tuple(c for t in _cat_inputs(node, env) for c in t)
            elif name in ELEMENTWISE:
                env[node] = _merge(tensors)
            else:
                env[node] = None
        else:
            env[node] = None
    for name, m in model.named_modules():
        if isinstance(m, PRODUCERS):
            sources.setdefault(name, None)
    return sources


def _check_weights_go_through_forward(model: nn.Module, graph: fx.Graph) -> None:
    """A quantized layer whose weight the model reads itself (Swin's attention passes `qkv.weight` to a function)
    would train and be counted as quantized while its float weight is what runs: refuse, naming it."""
    weights = [str(n.target) for n in graph.nodes if n.op == "get_attr" and str(n.target).endswith(".weight")]
    read = [target.rpartition(".")[0] for target in weights]
    bypassed = [name for name in dict.fromkeys(read) if hasattr(model.get_submodule(name), "weight_quantizer")]
    if bypassed:
        raise ValueError(
            f"The model reads the weight of the quantized layers {bypassed} itself, not through their forward, so "
            f"their quantizers would not act. Leave them out: exclude={bypassed} (SelfCompression, QuantizationConfig, "
            "or compression.exclude in lsc-train)."
        )


def _flatten(value: object) -> _Flat | None:
    if isinstance(value, _Flat):
        return value
    return _Flat(value) if isinstance(value, tuple) else None


def _flattens_from_dim1(node: fx.Node) -> bool:
    """`x.flatten(1)`, `torch.flatten(x, 1)`, `x.view(n, -1)`, `x.reshape(n, f, 1, 1)`: batch kept, channels first."""
    if op_name(node) == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1
    return len(node.args) > 1  # view/reshape keep channel-major order as long as dim 0 is the batch


def _cat_dim(node: fx.Node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


def _cat_inputs(node: fx.Node, env: dict) -> list:
    return [env.get(a) if isinstance(a, fx.Node) else None for a in node.args[0]]

