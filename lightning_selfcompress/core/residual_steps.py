"""Trained int8 steps on the inputs of residual Adds, so that a runtime adds in int8 and the convolutions on both
sides of the Add end in integer kernels.

A layer's `input_quantizer` covers what a convolution reads; a residual `x + f(x)` reads two more tensors: the skip
`x` (often also the input of the block's first layer) and the branch's end `f(x)`. Neither is a layer's input, so
each is quantized where it is made: a forward hook (`OutputStep`) on the module that produces it passes its output
through an `ActivationQuantizer`; a tensor a function makes is hooked on the block whose output it is (a branch
ending in torchvision's stochastic depth). Where no module makes it once per forward (torchvision's blocks apply
one ReLU module twice, so the skip is the previous block's second ReLU call), the skip is quantized where it enters
the block instead: a forward pre-hook (`InputStep`) on the block, which its readers inside see. The skip takes the
step of the layer that reads it too (the quantizer is shared, registered on a producer too, and quantizing an input
twice with one step changes nothing); the branch learns its own, registered as the producer's `output_quantizer`.
In the export's trace (`marking_steps`) the hooks leave a marker node (`lsc::Step`, the step in its attributes) on
the tensor, which the export turns into QuantizeLinear/DequantizeLinear for every reader.

Only where it can be exact: the Add's sum reaches a quantized layer with a trained input step (through ReLU, pooling
or reshapes; through an average pool, which does not commute with rounding, the sum stays float in the file, and the
inputs' steps still end the convolutions before it in integer kernels: a torchvision ResNet's last block), each input
is hooked on a module that runs once per forward (the one that makes it, or the block it enters, which reads nothing
else from outside), and no two differently stepped layers read it there. Other Adds stay float, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
from collections import Counter
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .ops import MAX_POOL_FUNCTIONS, MAX_POOLS, leaf_trace, node_is
from .quant import ActivationQuantizer, input_steps

__all__ = [
    "MARK_DOMAIN",
    "MARK_OP",
    "InputStep",
    "OutputStep",
    "attach_residual_steps",
    "has_residual_steps",
    "marking_steps",
]

MARK_DOMAIN, MARK_OP = "lsc", "Step"
_ADDS = (operator.add, operator.iadd, torch.add)
# ops an Add's sum may pass on its way to a stepped layer (the export's Q/DQ on the sum then stays exact or calibrated;
# after an average, which does not commute with rounding, the Add stays float and only its inputs are stepped)
_PASS_MODULES = (
    nn.ReLU, *MAX_POOLS, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.Flatten,
)  # fmt: skip
_PASS_FUNCTIONS = (
    F.relu, torch.relu, torch.flatten, *MAX_POOL_FUNCTIONS, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
)  # fmt: skip
_PASS_METHODS = ("relu", "flatten", "view", "reshape")
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # a module registered on them would run, or be iterated


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


def _step(quantizer: ActivationQuantizer, x: Tensor) -> Tensor:
    if _marking.get():
        return _Marked.apply(x, quantizer.scale, bool(quantizer.unsigned)) if quantizer.initialized else x
    # forward, not __call__: a step shared with the layer that reads the skip runs as that layer's input once more,
    # and hooks on it (the export's code check) must see one call per forward, that layer's
    return quantizer.forward(x)


class OutputStep:
    """Forward hook: the module's output through `quantizer` (trained like a layer's input step; marked where
    `marking_steps` asks, once the step has started)."""

    def __init__(self, quantizer: ActivationQuantizer) -> None:
        self.quantizer = quantizer

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return _step(self.quantizer, output)


class InputStep(OutputStep):
    """Forward pre-hook: the module's (only) input through `quantizer`, as `OutputStep` does with an output."""

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (_step(self.quantizer, args[0]), *args[1:]) if args and isinstance(args[0], Tensor) else args


def _hooked(module: nn.Module) -> bool:
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(isinstance(hook, OutputStep) for hook in hooks)


def has_residual_steps(model: nn.Module) -> bool:
    """Whether any module of `model` passes its output or input through a trained step (`OutputStep`, `InputStep`)."""
    return any(_hooked(m) for m in model.modules())


def _residual_add(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The Add of two computed tensors whose sum, through ReLU, pooling or reshapes, is `node`."""
    while isinstance(node, fx.Node) and node_is(node, modules, _PASS_MODULES, _PASS_FUNCTIONS, _PASS_METHODS):
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


def _scope(node: fx.Node) -> dict[str, tuple]:
    """The modules a traced node runs inside, outermost first: key (a module's path, `@n` on its (n+1)-th call) ->
    (its path, its type)."""
    return node.meta.get("nn_module_stack", {})


def attach_residual_steps(model: nn.Module, unsigned: bool = False, graph: fx.Graph | None = None) -> list[str]:
    """Hook a trained int8 step onto both inputs of each residual Add of `model` that feeds a layer with a trained
    input step (see the module docstring); `unsigned`: a new step may take the uint8 grid (`ActivationQuantizer`);
    `graph`: the model's trace (`LeafTracer`), where the caller has one. Idempotent (call again after a surgery or
    before a resume); a model torch.fx cannot trace keeps its Adds float. Returns the modules hooked, by name."""
    steps = input_steps(model)
    if not steps:
        return []
    graph = graph if graph is not None else leaf_trace(model)
    if graph is None:
        return []
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    entered = {key for node in graph.nodes for key in _scope(node)}  # a block called twice has a key `path@1`

    def step_of(readers: list[fx.Node]) -> ActivationQuantizer | None | bool:
        """The step the stepped readers share (None: no stepped reader), or False: two steps, no hook can serve."""
        shared = {id(steps[u.target]): steps[u.target] for u in readers if u.op == "call_module" and u.target in steps}
        return False if len(shared) > 1 else next(iter(shared.values()), None)

    def once(key: str | None) -> bool:
        return key is not None and "@" not in key and f"{key}@1" not in entered

    def inside(key: str) -> set[fx.Node]:
        return {node for node in graph.nodes if key in _scope(node)}

    def producer(tensor: fx.Node, add: fx.Node) -> tuple[str, list[fx.Node], type] | None:
        """The module that makes `tensor`, run once per forward: a leaf, or the block whose output it is (a
        function's inside it: torchvision's stochastic depth), which holds no Add reader; every reader sees its
        output's step."""
        if tensor.op == "call_module":
            return (tensor.target, list(tensor.users), OutputStep) if calls[tensor.target] == 1 else None
        key = next((k for k in _scope(tensor) if k not in _scope(add)), None)
        if not once(key) or isinstance(modules[_scope(tensor)[key][0]], _CONTAINERS):
            return None
        block = inside(key)
        leaving = {node for node in block if any(user not in block for user in node.users)}
        return (_scope(tensor)[key][0], list(tensor.users), OutputStep) if leaving == {tensor} else None

    def entry(tensor: fx.Node, add: fx.Node) -> tuple[str, list[fx.Node], type] | None:
        """The block through which `tensor` reaches the Add, called once and reading nothing else from outside: its
        readers inside see its input's step, which must be one of theirs (nothing is registered on a block: a
        Sequential runs every module it holds)."""
        key = next((k for k in _scope(add) if k not in _scope(tensor)), None)
        if not once(key):
            return None
        block = inside(key)
        outside = {i for node in block for i in node.all_input_nodes if i not in block and i.op != "get_attr"}
        if outside != {tensor}:
            return None
        return _scope(add)[key][0], [u for u in tensor.users if u in block], InputStep

    def site(tensor: fx.Node, add: fx.Node) -> tuple[str, type, ActivationQuantizer | None] | None:
        for where in (producer(tensor, add), entry(tensor, add)):
            step = step_of(where[1]) if where is not None else False
            if step is not False and (step is not None or where[2] is OutputStep):
                return where[0], where[2], step
        return None

    hooked = []
    for node in graph.nodes:
        add = _residual_add(node.args[0], modules) if node.op == "call_module" and node.target in steps else None
        plan = [site(tensor, add) for tensor in add.args] if add is not None else [None]
        if None in plan:
            continue
        for name, hook, step in plan:
            module = modules[name]
            if _hooked(module):
                continue
            if hook is InputStep:
                module.register_forward_pre_hook(InputStep(step))
            else:
                if step is None:
                    step = ActivationQuantizer(unsigned).to(next(model.parameters()).device)
                module.add_module("output_quantizer", step)  # a shared step is registered here too: its state loads
                module.register_forward_hook(OutputStep(step))
            hooked.append(name)
    return hooked
