"""Trained int8 steps on the inputs of residual Adds, so that a runtime adds in int8 and the convolutions on both
sides of the Add end in integer kernels.

A layer's `input_quantizer` covers what a convolution reads; a residual `x + f(x)` reads two more tensors: the skip
`x` (often also the input of the block's first layer) and the branch's end `f(x)`. Neither is a layer's input, so
each is quantized where it is made: a forward hook (`OutputStep`) on the module that produces it passes its output
through an `ActivationQuantizer`. The skip takes the step of the layer that reads it too (the quantizer is shared,
registered on both modules, and quantizing an input twice with one step changes nothing); the branch learns its own,
registered as the producer's `output_quantizer`. In the export's trace (`marking_steps`) the hook leaves a marker node
(`lsc::Step`, the step in its attributes) on the tensor, which the export turns into QuantizeLinear/DequantizeLinear
for every reader.

Only where it can be exact: the Add's sum reaches a quantized layer with a trained input step (through ReLU, pooling
or reshapes), and each input is the output of a module that runs once per forward (a hook on a module called twice,
as torchvision's ResNets reuse one ReLU, would quantize both calls) and that no two differently stepped layers read.
Other Adds stay float, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .ops import LeafTracer
from .quant import ActivationQuantizer, input_steps

__all__ = ["MARK_DOMAIN", "MARK_OP", "OutputStep", "attach_residual_steps", "has_output_steps", "marking_steps"]

MARK_DOMAIN, MARK_OP = "lsc", "Step"
_ADDS = (operator.add, operator.iadd, torch.add)
# ops an Add's sum may pass on its way to a stepped layer (the export's Q/DQ on the sum then stays exact or calibrated)
_PASS_MODULES = (
    nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Flatten,
)  # fmt: skip
_PASS_FUNCTIONS = (F.relu, torch.relu, torch.flatten, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool2d)
_PASS_METHODS = ("relu", "flatten", "view", "reshape")


class _Marked(torch.autograd.Function):
    """The identity, exported as an `lsc::Step` node carrying the step: where the export puts Q/DQ."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float, unsigned: bool) -> Tensor:
        return x.clone()  # not x itself: a reader may add to it in place (`out += identity`)

    @staticmethod
    def symbolic(g, x, scale: float, unsigned: bool):
        marked = g.op(f"{MARK_DOMAIN}::{MARK_OP}", x, scale_f=scale, unsigned_i=int(unsigned))
        marked.setType(x.type())
        return marked


_marking = contextvars.ContextVar("marking", default=False)


@contextlib.contextmanager
def marking_steps() -> Iterator[None]:
    """For the duration, the hooks mark their tensors instead of quantizing them: for the export's trace only (any
    other pass, traced or not, runs the quantizer)."""
    token = _marking.set(True)
    try:
        yield
    finally:
        _marking.reset(token)


class OutputStep:
    """Forward hook: the module's output through `quantizer` (trained like a layer's input step; marked where
    `marking_steps` asks, once the step has started)."""

    def __init__(self, quantizer: ActivationQuantizer) -> None:
        self.quantizer = quantizer

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        quantizer = self.quantizer
        if _marking.get():
            return _Marked.apply(output, quantizer.scale, bool(quantizer.unsigned)) if quantizer.initialized else output
        # forward, not __call__: a step shared with the layer that reads the skip runs as that layer's input once
        # more, and hooks on it (the export's code check) must see one call per forward, that layer's
        return quantizer.forward(output)


def _hooked(module: nn.Module) -> bool:
    return any(isinstance(hook, OutputStep) for hook in module._forward_hooks.values())


def has_output_steps(model: nn.Module) -> bool:
    """Whether any module of `model` passes its output through a trained step (`OutputStep`)."""
    return any(_hooked(m) for m in model.modules())


def _passes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES)
    return (node.op == "call_function" and node.target in _PASS_FUNCTIONS) or (
        node.op == "call_method" and node.target in _PASS_METHODS
    )


def _residual_add(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The Add of two computed tensors whose sum, through ReLU, max-pooling or reshapes, is `node`."""
    while isinstance(node, fx.Node) and _passes(node, modules):
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.kwargs:
        return None
    adds = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    inputs = node.args[:2]
    if adds and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in inputs) and inputs[0] is not inputs[1]:
        return node
    return None


def attach_residual_steps(model: nn.Module, unsigned: bool = False) -> list[str]:
    """Hook a trained int8 step onto both inputs of each residual Add of `model` that feeds a layer with a trained
    input step (see the module docstring); `unsigned`: a new step may take the uint8 grid (`ActivationQuantizer`).
    Idempotent (call again after a surgery or before a resume); a model torch.fx cannot trace keeps its Adds float.
    Returns the producing modules hooked, by name."""
    steps = input_steps(model)
    if not steps:
        return []
    try:
        graph = LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: these Adds are an optimisation, not a requirement
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def step_of(tensor: fx.Node) -> ActivationQuantizer | None | bool:
        """The step the tensor's stepped readers share (None: no stepped reader), or False: it cannot be hooked."""
        if tensor.op != "call_module" or calls[tensor.target] != 1:
            return False
        shared = {
            id(steps[u.target]): steps[u.target] for u in tensor.users if u.op == "call_module" and u.target in steps
        }
        return False if len(shared) > 1 else next(iter(shared.values()), None)

    hooked = []
    for node in graph.nodes:
        add = _residual_add(node.args[0], modules) if node.op == "call_module" and node.target in steps else None
        plan = [(tensor, step_of(tensor)) for tensor in add.args] if add is not None else []
        if not plan or any(step is False for _, step in plan):
            continue
        for tensor, step in plan:
            producer = modules[tensor.target]
            if _hooked(producer):
                continue
            if step is None:
                step = ActivationQuantizer(unsigned).to(next(model.parameters()).device)
            producer.add_module("output_quantizer", step)  # a shared step is registered here too: its state loads
            producer.register_forward_hook(OutputStep(step))
            hooked.append(tensor.target)
    return hooked
