"""The rules by which the channel walker follows a module or a function: torch's own, and those of one's own.

The walker (core/groups.py; strict for surgery, lenient for size accounting) looks every module and op up here.
torch's activations, poolings, dropouts and value casts are registered below; layers with weights (Conv/Linear, the
normalisations) and the ops that move channels (view, permute, cat) the walker handles itself. A block it does not
know (a custom activation, a pooling written by hand) stops surgery with an error naming it; a rule says how it
treats the channels that reach it, and the walker then keeps a registered module whole (a leaf of the torch.fx
trace) and follows it by its rule:

    from lightning_selfcompress import Rule, register_rule

    class ScaledErf(nn.Module):          # each channel on its own, the same function for every channel
        def forward(self, x):
            return torch.erf(x) * 1.5

    register_rule(ScaledErf, Rule.ELEMENTWISE)

A function registers the same way; torch.fx must see it as one call (`torch.fx.wrap` it where it is defined).

Attention is OPAQUE: it reads every channel of every input (queries, keys, values) and writes values the tracer
cannot map back to them. So everything it reads keeps all its channels and what it returns counts as new channels
that stay, while the layers around it (a transformer's MLP hidden units) are still cut. PyTorch's and torchvision's
attention blocks are registered so; register your own the same way.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from torch import nn

__all__ = ["Rule", "register_rule", "rule_of"]


class Rule(enum.Enum):
    """How a module or function treats the channels (dim 1) of its one tensor input; the output has the same ones."""

    ELEMENTWISE = "apply"  # every value on its own, by the same function (an activation): a constant c becomes f(c)
    KEEPS_CONSTANTS = "keep"  # moves values within a channel (pooling, resampling): a constant channel stays itself
    ZEROS_ONLY = "zeros_only"  # within a channel, but only a channel of zeros stays constant (a zero-padded average)
    EVAL_IDENTITY = "dropout"  # the identity in eval mode; in train mode zeroes or scales values or whole samples
    # (dropout, stochastic depth): a constant channel stays constant in eval mode, only a zero one in train mode
    MIXES_CHANNELS = "opaque"  # reads across channels (a normalisation over them): its channels are never removed
    OPAQUE = "new"  # reads all its inputs whole, writes new channels (attention): all of them stay


_RULES: dict[object, Rule] = {}

# torch's own ops, by the name torch.fx records (a function's __name__, a method's name).
_OPS: dict[str, Rule] = {
    **dict.fromkeys(
        ("relu", "relu_", "relu6", "gelu", "silu", "mish", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
         "leaky_relu", "elu", "softplus", "clamp", "clamp_min", "clamp_max", "neg",
         "contiguous", "clone", "float", "to", "type_as", "detach"),  # a cast or copy is a function of each value too
        Rule.ELEMENTWISE,
    ),  # fmt: skip
    **dict.fromkeys(
        ("max_pool1d", "max_pool2d", "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
         "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate"),
        Rule.KEEPS_CONSTANTS,
    ),  # fmt: skip
    **dict.fromkeys(("avg_pool1d", "avg_pool2d", "avg_pool3d"), Rule.ZEROS_ONLY),  # padding may count as zeros
    **dict.fromkeys(("dropout", "dropout1d", "dropout2d", "dropout3d", "stochastic_depth"), Rule.EVAL_IDENTITY),
}
# torch's own modules (a per-channel PReLU and the poolings that may count padding the walker handles itself).
_MODULES: tuple[tuple[tuple[type[nn.Module], ...], Rule], ...] = (
    ((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish,
      nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity), Rule.ELEMENTWISE),
    ((nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
      nn.Upsample), Rule.KEEPS_CONSTANTS),
    ((nn.modules.dropout._DropoutNd,), Rule.EVAL_IDENTITY),
)  # fmt: skip

# Attention blocks known by name, so that neither PyTorch's nor torchvision's module has to be imported to know them.
_BUILTIN: dict[str, Rule] = {
    "torch.nn.modules.activation.MultiheadAttention": Rule.OPAQUE,
    "torch._C._nn.scaled_dot_product_attention": Rule.OPAQUE,
    "torchvision.models.swin_transformer.shifted_window_attention": Rule.OPAQUE,
    # zero-pads height and width of a channels-last tensor before patch merging, whose LayerNorm keeps them anyway
    "torchvision.models.swin_transformer._patch_merging_pad": Rule.OPAQUE,
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": Rule.OPAQUE,
}


def _builtin(target: object) -> Rule | None:
    return _BUILTIN.get(f"{getattr(target, '__module__', None)}.{getattr(target, '__qualname__', None)}")


def register_rule(target: type[nn.Module] | Callable, rule: Rule) -> None:
    """Teach the channel walker `target` (a module class, for it and its subclasses, or a function)."""
    if not isinstance(rule, Rule):
        raise TypeError(f"rule={rule!r} is not a Rule; use one of {[r.name for r in Rule]}.")
    if not (isinstance(target, type) and issubclass(target, nn.Module)) and not callable(target):
        raise TypeError(f"target={target!r} is neither an nn.Module class nor a function.")
    _RULES[target] = rule


def rule_of(target: object) -> Rule | None:
    """The rule for a module (by its class, or the nearest registered base class), a function, or a method's name:
    one registered with `register_rule` first, else torch's own."""
    if isinstance(target, nn.Module):
        registered = (_RULES.get(c) or _builtin(c) for c in type(target).__mro__ if c in _RULES or _builtin(c))
        if (rule := next(registered, None)) is not None or not type(target).__module__.startswith("torch.nn."):
            return rule  # a subclass of one of torch's modules is traced through, as any module of one's own
        return next((rule for kinds, rule in _MODULES if isinstance(target, kinds)), None)
    if isinstance(target, str):
        return _OPS.get(target)
    try:
        return _RULES.get(target) or _builtin(target) or _OPS.get(getattr(target, "__name__", None))
    except TypeError:  # an unhashable target has no rule
        return None
