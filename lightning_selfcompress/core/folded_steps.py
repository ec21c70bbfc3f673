"""Trained int8 input steps that stay exact where the export folds a BatchNorm away: Conv -> ReLU -> BatchNorm ->
(max-pooling, reshapes) -> a stepped layer, the main job's blocks.

The export folds such a BatchNorm (y = a r + t per channel, a > 0) into its neighbours (`onnx_fold`): a into the
convolution before the ReLU, whose integers stay, and t into the bias of the layer after it. In the file that layer
then reads the pooled a r, and only there can its input QuantizeLinear sit: next to the convolution before, which
ONNX Runtime then runs as an integer kernel with that output step. A step trained on the BatchNorm's output y would
need the file to keep the BatchNorm, and the convolution before it ran float (2 of the main job's 5 layers integer,
1.7x / 2.3x the float network where its calibrated file ran 2.5x / 3.6x). So the step quantizes y less t, x ->
q(x - t) + t, which the file computes with t in the bias: t is the BatchNorm's own shift on each forward (batch
statistics in training, running ones in eval), kept by a hook on it (`BatchNormShift`).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from .ops import PRODUCERS, leaf_trace, node_is
from .quant import input_steps

__all__ = ["BatchNormShift", "attach_folded_steps"]

# (modules, functions, methods): what carries a per-channel shift unchanged to the next layer (as
# `onnx_fold.SHIFT_TRANSPARENT`), and the chain the layer's input then comes from, nearest first
_CARRY = (
    (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten),
    (F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten),
    ("flatten", "view", "reshape"),
)
_CHAIN = (((_BatchNorm,), (), ()), ((nn.ReLU,), (F.relu, torch.relu), ("relu",)), (PRODUCERS, (), ()))


class BatchNormShift:
    """Forward hook on a BatchNorm: keeps the per-channel shift t = beta - a mean it applied on this forward (`value`),
    from the batch's statistics in training and the running ones in eval, as BatchNorm computes them. Without a
    gradient: in q(x - t) + t, inside the step's range t's two uses cancel (and a kept graph would hold the
    parameters' old shapes past a surgery)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    @torch.no_grad()
    def __call__(self, bn: _BatchNorm, args: tuple, output: Tensor) -> None:
        r = args[0]
        if bn.training or bn.running_mean is None:
            dims = [0, *range(2, r.dim())]
            mean, var = r.mean(dims), r.var(dims, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        a = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight
        self.value = -a * mean if bn.bias is None else bn.bias - a * mean


def _read_once(node: object) -> bool:
    """Whether `node` is a traced tensor whose values one node reads (its shape may be read too: `x.shape[0]`)."""
    if not isinstance(node, fx.Node):
        return False
    values = [u for u in node.users if not (u.op == "call_function" and u.target is getattr)]
    return len([u for u in values if u.target not in ("size", "dim")]) == 1


def _unpadded(layer: nn.Module) -> bool:
    """A shift added to the input passes a layer as a bias only where it has no zero padding (which would see 0)."""
    if not isinstance(layer, _ConvNd):
        return True
    return layer.padding == "valid" or (not isinstance(layer.padding, str) and not any(layer.padding))


def attach_folded_steps(model: nn.Module, graph: fx.Graph | None = None) -> list[str]:
    """Make each stepped layer of `model` that reads Conv -> ReLU -> BatchNorm (through max-pooling or reshapes, each
    read there alone) quantize its input less that BatchNorm's shift (see the module docstring). Only layers without
    zero padding, whose step no other layer or residual Add shares and has not started unshifted, each module run
    once. `graph`: the model's trace (`LeafTracer`), where the caller has one. Idempotent; returns the layers whose
    steps it shifted."""
    steps = input_steps(model)
    graph = graph if graph is not None else (leaf_trace(model) if steps else None)
    if graph is None:
        return []
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    uses = Counter(id(step) for step in steps.values())
    for module in modules.values():  # a residual Add's step (`residual_steps`) shared with a layer's: left as it is
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        uses.update(id(h.quantizer) for h in hooks if isinstance(getattr(h, "quantizer", None), nn.Module))
    shifted = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in steps or calls[node.target] != 1:
            continue
        step = steps[node.target]
        if uses[id(step)] > 1 or (step.initialized and not step.shifted) or not _unpadded(modules[node.target]):
            continue
        x = node.args[0] if node.args else None
        while _read_once(x) and node_is(x, modules, *_CARRY):
            x = x.args[0]
        chain = []
        for kind in _CHAIN:
            if not (_read_once(x) and node_is(x, modules, *kind)) or (x.op == "call_module" and calls[x.target] != 1):
                break
            chain.append(x)
            x = x.args[0] if x.args else None
        if len(chain) < len(_CHAIN):
            continue
        bn = modules[chain[0].target]
        hook = next((h for h in bn._forward_hooks.values() if isinstance(h, BatchNormShift)), None)
        if hook is None:
            hook = BatchNormShift()
            bn.register_forward_hook(hook)
        step.quantize_around(hook)
        shifted.append(node.target)
    return shifted
