"""Groups of coupled channels: which channels must be removed together, and where each one is produced, normalised
and consumed. Traced once with torch.fx on an example input, by the one channel walker of the package, in two modes:
strict for surgery (what it cannot follow is an error) and lenient for size accounting (what it cannot follow writes
new channels of unknown origin, and a branch already re-embedded is followed through its zeros).

Every channel that flows through the network is a slot. A Conv/Linear output creates slots; a residual add or an
elementwise product ties slots together (removing one means removing the other), and so does a grouped convolution
for the inputs and outputs of each of its groups (depthwise: input j with its outputs); a concatenation lines
slots up; a flatten repeats a channel's slot once per feature it becomes. Tied slots form a group, the
unit of removal. Per module the graph records the group of each position: output channel of a producer
(Conv/Linear), input feature of a consumer (Conv/Linear), channel of a per-channel module sliced with the group
(BatchNorm, InstanceNorm, PReLU). Groups that reach the model's input or output or a normalisation across
channels are pinned: never removed.

A branch is a chain from a producer's outputs, through per-channel modules, to one operand of a residual add, read
by nothing else. Its channels can also go from that branch alone: the stream keeps them, and the branch's last
module re-embeds its output at the stream's width (core/reembed.py).

The graph is read-only: it describes the model as traced. What a surgeon removed since is its own `Cuts`: groups
removed, a mask, and channels cut from a branch alone, a mask per branch, so the history stays in original indexing
and the constants a dead channel carries are followed through the original graph (`constants`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..errors import SelfCompressError
from .inputs import HINT, describe
from .ops import (
    ELEMENTWISE, LAYOUT_OPS, MOVES, NON_TENSOR_OPS, NORMS, PRODUCERS, LeafTracer, one_channel_per_group, op_name,
)  # fmt: skip
from .reembed import reembedding_of
from .rules import Rule, rule_of

__all__ = ["Branch", "ChannelGraph", "Cuts", "GraphError"]


class GraphError(SelfCompressError, ValueError):
    """The channel graph cannot follow the model, or the model no longer matches the graph."""


@dataclass
class Branch:
    """Producer -> per-channel modules -> tail -> one operand of a residual add; nothing else reads the chain, so
    its channels can leave this branch alone (the tail's output is re-embedded at the stream's width)."""

    producer: str
    members: list[str]  # per-channel modules on the chain (BatchNorm, PReLU), sliced with the producer's outputs
    tail: str  # the module whose output the add reads
    tail_node: str
    steps: list[int]  # the chain's steps, tail first
    dim: int = 1  # the dimension the tail's output holds its channels in (the last, channels-last)


_BRANCH_ADDS = (operator.add, operator.sub)  # a channel that went adds exactly zero
_CHAIN_KINDS = ("norm", "apply", "keep", "dropout", "zeros_only")


@dataclass
class _Step:
    """How one node maps its channel inputs' positions to its output's; replayed to follow constants."""

    node: str
    kind: str  # new | produce | norm | apply | opaque | keep | zeros_only | dropout | elementwise | cat | cat_other
    # | gather | reembed
    sources: list[str]
    slots: list[int]
    payload: object = None


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    inside = f" inside module '{list(stack)[-1]}'" if stack else ""
    return f"node '{node.name}' ({node.op} '{op_name(node)}'){inside}"


def channels_of(m: nn.Module) -> int:
    """The channel count of a per-channel module."""
    for attr in ("num_features", "num_parameters", "num_channels"):
        if hasattr(m, attr):
            return int(getattr(m, attr))
    raise TypeError(f"{type(m).__name__} has no channel count")


def is_grouped(m: nn.Module) -> bool:
    """A grouped (or depthwise) convolution: its input and output channels go together, a whole group at a time."""
    return isinstance(m, _ConvNd) and m.groups > 1


class ChannelGraph:
    """The coupled channel groups of `model`, traced once on `example_input` (one or two samples are enough).

    `outputs`, `inputs`, `members`: per module name, the group of each original position (output channel, input
    feature, channel). `pinned`: groups never removed, with the reason. `branches`: per producer, its residual
    branch. Read-only: what has been removed since is a `Cuts`.
    `consumers`: per Conv/Linear, the nodes whose output it reads. `spatial`: per Conv/Linear, output positions per
    channel for one sample (for multiply-accumulate counts). `strict=False`: the lenient mode of size accounting,
    for `input_producers` only (what it cannot follow is unknown, not an error; cut branches are followed).
    """

    def __init__(self, model: nn.Module, example_input: Tensor, strict: bool = True) -> None:
        self.model, self.strict = model, strict
        self.input_shape, self.input_dtype = tuple(example_input.shape), example_input.dtype  # to trace it again
        try:
            self.fx_graph = LeafTracer().trace(model)
        except Exception as error:  # noqa: BLE001 - any tracing failure is reported with its cause
            raise GraphError(
                f"torch.fx cannot trace {type(model).__name__}: {type(error).__name__}: {error}. Channel surgery "
                "needs a traceable forward (no data-dependent Python control flow on tensors)."
            ) from error
        self._parent: list[int] = []
        self._pins: dict[int, str] = {}
        self._output_slots: list[int] = []
        self._tables: dict[str, dict[str, list[int]]] = {"outputs": {}, "inputs": {}, "members": {}}
        self.steps: list[_Step] = []
        self.channel_dims: dict[str, int] = {}  # per node whose channels lie in a dim other than 1
        self.consumers: dict[str, list[str]] = {}
        self.spatial: dict[str, int] = {}
        modes = {m: m.training for m in model.modules()}
        model.eval()  # the trace needs shapes only: no running-statistics update, no dropout
        try:
            with torch.no_grad():
                _Walker(self).run(example_input)
        finally:
            for m, training in modes.items():
                m.training = training
        self._finalize()
        self._find_branches()

    # ---- building ------------------------------------------------------------------------------------------------

    def new_slots(self, n: int, pin: str | None = None) -> list[int]:
        """`n` fresh channel slots, each its own group until tied; pinned (not removable) when `pin` gives a reason."""
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        if pin:
            self._pins.update(dict.fromkeys(range(start, start + n), pin))
        return list(range(start, start + n))

    def pin(self, slots: list[int], reason: str) -> None:
        """Mark `slots` as not removable, saying why (the reason a refused removal reports)."""
        for s in slots:
            self._pins.setdefault(s, reason)

    def _find(self, s: int) -> int:
        while self._parent[s] != s:
            self._parent[s] = self._parent[self._parent[s]]
            s = self._parent[s]
        return s

    def tie(self, a: list[int], b: list[int]) -> None:
        """Put the channels of `a` and `b` pairwise into one group: they can only be removed together."""
        for x, y in zip(a, b, strict=True):
            rx, ry = self._find(x), self._find(y)
            if rx != ry:
                self._parent[max(rx, ry)] = min(rx, ry)

    def record(self, table: str, module: str, slots: list[int]) -> None:
        """Note that `module`'s `table` (outputs, inputs or members) holds the channels `slots`."""
        known = self._tables[table]
        if module in known:  # a module called twice: its weights serve both calls, so the channels are tied
            self.tie(known[module], slots)
        else:
            known[module] = list(slots)

    def _finalize(self) -> None:
        roots = [self._find(s) for s in range(len(self._parent))]
        number = {root: i for i, root in enumerate(dict.fromkeys(roots))}
        self._group = torch.tensor([number[r] for r in roots], dtype=torch.long)
        self.num_groups = len(number)
        self.pinned: dict[int, str] = {}
        for slot, reason in self._pins.items():
            self.pinned.setdefault(int(self._group[slot]), reason)
        self.outputs, self.inputs, self.members = (
            {name: self.groups_of(slots) for name, slots in self._tables[t].items()}
            for t in ("outputs", "inputs", "members")
        )
        self._keys: dict[int, tuple[str, int]] = {}
        for name, groups in self.outputs.items():
            for channel, group in enumerate(groups.tolist()):
                self._keys.setdefault(group, (name, channel))
        self._step_groups = [self.groups_of(step.slots) for step in self.steps]
        self.pinned_mask = torch.zeros(self.num_groups, dtype=torch.bool)
        self.output_mask = torch.zeros(self.num_groups, dtype=torch.bool)  # the groups the model outputs
        self.output_mask[self.groups_of(self._output_slots)] = True
        self.pinned_mask[list(self.pinned)] = True

    def _find_branches(self) -> None:
        nodes = {n.name: n for n in self.fx_graph.nodes}
        index = {step.node: i for i, step in enumerate(self.steps)}
        calls: dict[str, int] = {}
        for n in self.fx_graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        self.branches: dict[str, Branch] = {}
        for step in self.steps:
            if step.kind == "elementwise" and step.payload[0] in _BRANCH_ADDS:
                for source in step.sources:
                    branch = self._branch(nodes[source], nodes, index, calls)
                    if branch is not None:
                        self.branches[branch.producer] = branch
        self._chain = {(b.producer, "outputs"): b.producer for b in self.branches.values()}
        self._chain.update({(m, "members"): b.producer for b in self.branches.values() for m in b.members})
        self._step_branch = {i: b.producer for b in self.branches.values() for i in b.steps}

    def _branch(self, tail: fx.Node, nodes: dict, index: dict, calls: dict) -> Branch | None:
        """The branch ending at `tail`, if the chain from its producer is private to this add and keeps positions."""
        if tail.op != "call_module" or tail.name not in index:
            return None
        node, members, chain = tail, [], []
        while True:
            step = self.steps[index[node.name]]
            if len(node.users) != 1 or (node.op == "call_module" and calls[node.target] != 1):
                return None
            chain.append(index[node.name])
            if step.kind == "produce":
                if is_grouped(self.model.get_submodule(step.payload)):
                    return None
                return Branch(step.payload, members, tail.target, tail.name, chain, self.channel_dims.get(tail.name, 1))
            if step.kind not in _CHAIN_KINDS or step.sources[0] not in index:
                return None
            if self.steps[index[step.sources[0]]].slots != step.slots:
                return None
            if node.op == "call_module" and node.target in self.members:
                members.append(node.target)
            node = nodes[step.sources[0]]

    def groups_of(self, slots: list[int]) -> Tensor:
        """The group of each slot in `slots`."""
        return self._group[torch.tensor(slots, dtype=torch.long)] if slots else torch.zeros(0, dtype=torch.long)

    # ---- queries -------------------------------------------------------------------------------------------------

    def tables(self, module: str) -> dict[str, Tensor]:
        """The module's positions by role: any of 'outputs', 'inputs', 'members'."""
        return {role: t[module] for role, t in (("outputs", self.outputs), ("inputs", self.inputs),
                                                ("members", self.members)) if module in t}  # fmt: skip

    def modules(self) -> list[str]:
        """Every module whose channels the graph records."""
        return list(dict.fromkeys([*self.outputs, *self.inputs, *self.members]))

    def output_producers(self) -> list[str]:
        """The producers whose every channel is one the model outputs (a classifier's logits)."""
        return [name for name, groups in self.outputs.items() if len(groups) and bool(self.output_mask[groups].all())]

    def branch_of(self, module: str, role: str) -> str | None:
        """The producer of the residual branch whose channels these positions are (its outputs and members)."""
        return self._chain.get((module, role))

    def input_producers(self) -> dict[str, list[frozenset[tuple[str, int]] | None]]:
        """Per Conv/Linear layer as traced, per input position: the (layer, output channel) pairs whose values reach
        it, in the order the data flows (a residual sum unites its operands there, not along the whole stream as the
        groups do); None where something else feeds it (the model's input, an opaque block, a normalisation across
        channels). What size accounting needs: a position is constant when all of its producers are dead."""
        env: dict[str, list] = {}
        for step in self.steps:
            env[step.node] = _producer_step(step, [env[s] for s in step.sources])
        return {
            layer: [_union(at) for at in zip(*(env[s] for s in sources))] for layer, sources in self.consumers.items()
        }

    def macs(self) -> int:
        """Multiply-accumulates of one sample through every Conv/Linear at the model's current widths."""
        return sum(self.model.get_submodule(n).weight.numel() * s for n, s in self.spatial.items())

    def key(self, group: int) -> tuple[str, int]:
        """The group's name: its first producer's (module, original output channel); the model's input has none."""
        return self._keys.get(group, ("<model input>", -1))

    def group_of(self, module: str, channel: int) -> int:
        """The group of output channel `channel` of `module`, as traced."""
        if module not in self.outputs or not 0 <= channel < len(self.outputs[module]):
            raise GraphError(f"The traced model has no output channel {channel} in module '{module}'.")
        return int(self.outputs[module][channel])

    # ---- constants -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def constants(self, training: bool, dead: Callable[[str], Tensor | None], cuts: Cuts) -> dict[str, Tensor]:
        """Per node (by name), the constant each original position carries in train or eval mode; NaN: not constant.

        `dead(module)` gives, per original output channel of a producer, whether its weights are all zero (then the
        channel emits its bias). Positions `cuts` removed count as zeros: they no longer contribute anything.
        """
        env: dict[str, Tensor] = {}
        for i, (step, groups) in enumerate(zip(self.steps, self._step_groups)):
            inputs = [env[s] for s in step.sources]
            value = _constant_step(self, step, inputs, training, dead, cuts)
            value[cuts.removed[groups]] = 0.0
            if i in self._step_branch:  # re-embedded as zeros
                value[cuts.cut[self._step_branch[i]]] = 0.0
            env[step.node] = value
        return env


class Cuts:
    """What has been removed from a traced model since its `ChannelGraph` was traced (the surgeon's state): groups
    removed, and per branch producer the original positions cut from that branch alone; and the model's positions
    as they are now."""

    def __init__(self, graph: ChannelGraph) -> None:
        self.graph = graph
        self.removed = torch.zeros(graph.num_groups, dtype=torch.bool)
        self.cut = {p: torch.zeros(len(graph.outputs[p]), dtype=torch.bool) for p in graph.branches}

    def present(self, module: str, role: str) -> Tensor:
        """Which of the module's original positions in this role are still there."""
        mask = ~self.removed[getattr(self.graph, role)[module]]
        branch = self.graph.branch_of(module, role)
        return mask if branch is None else mask & ~self.cut[branch]

    def width(self, module: str, role: str) -> int:
        """How many of `module`'s `role` channels (outputs, inputs, members) are left."""
        return int(self.present(module, role).sum())

    def kept(self, module: str, role: str, remove: Tensor, cuts: dict[str, Tensor] | None = None) -> Tensor | None:
        """Of the module's current positions, the indices that stay when the groups `remove` go, and `cuts` (per
        branch producer, original positions) leave their branches; None: all stay."""
        present = self.present(module, role)
        going = remove[getattr(self.graph, role)[module]]
        branch = self.graph.branch_of(module, role)
        if cuts and branch in cuts:
            going = going | cuts[branch]
        going = going[present]
        return (~going).nonzero().flatten() if going.any() else None

    def expected_shape(self, module: str) -> dict[str, int]:
        """Per role, the width `module` has now if nothing but this surgeon changed it."""
        return {role: self.width(module, role) for role in self.graph.tables(module)}

    def check_unchanged(self) -> None:
        """Raise if a module's channel counts differ from what the graph expects (the model changed after tracing)."""
        for name in self.graph.modules():
            try:
                module = self.graph.model.get_submodule(name)
            except AttributeError as error:
                raise GraphError(f"Module '{name}' is gone since the channel graph was traced; rebuild the graph.") from error
            expected = self.expected_shape(name)
            actual = {role: module_width(module, role) for role in expected}
            if actual != expected:
                raise GraphError(
                    f"Module '{name}' ({type(module).__name__}) has {actual} positions but the channel graph expects "
                    f"{expected}: the model changed after tracing. Rebuild the ChannelGraph."
                )


def module_width(module: nn.Module, role: str) -> int:
    if role == "members":
        return channels_of(module)
    if isinstance(module, _ConvNd):
        return module.out_channels if role == "outputs" else module.in_channels
    return module.out_features if role == "outputs" else module.in_features


def _expand(cuts: Cuts, values: Tensor, module: str, role: str) -> Tensor:
    """A module's current per-channel values placed at their original positions (removed ones 0)."""
    present = cuts.present(module, role)
    out = torch.zeros(len(present), dtype=torch.float64)
    out[present] = values.detach().double().cpu()
    return out


def _constant_step(graph: ChannelGraph, step: _Step, inputs: list[Tensor], training: bool, dead, cuts: Cuts) -> Tensor:
    nan = torch.full((len(step.slots),), float("nan"), dtype=torch.float64)
    kind, payload = step.kind, step.payload
    if kind in ("new", "opaque"):
        return nan
    if kind == "produce":
        mask = dead(payload)
        if mask is None:
            return nan
        module = graph.model.get_submodule(payload)
        bias = (
            _expand(cuts, module.bias, payload, "outputs")
            if module.bias is not None
            else torch.zeros(len(graph.outputs[payload]), dtype=torch.float64)
        )
        return torch.where(mask, bias, nan)
    x = inputs[0] if inputs else None
    if kind == "norm":
        module = graph.model.get_submodule(payload)
        weight = _expand(cuts, module.weight, payload, "members") if module.weight is not None else torch.ones_like(x)
        bias = _expand(cuts, module.bias, payload, "members") if module.bias is not None else torch.zeros_like(x)
        if training or getattr(module, "running_mean", None) is None:  # batch statistics of a constant: c, 0
            return torch.where(x.isfinite(), bias, nan)
        mean = _expand(cuts, module.running_mean, payload, "members")
        var = _expand(cuts, module.running_var, payload, "members")
        return (x - mean) / torch.sqrt(var + module.eps) * weight + bias
    if kind == "apply":
        fn = graph.model.get_submodule(payload) if isinstance(payload, str) else payload
        if isinstance(fn, nn.PReLU) and fn.num_parameters > 1:
            weight = _expand(cuts, fn.weight, payload, "members")
            return torch.where(x >= 0, x, weight * x)
        fn = fn.forward if isinstance(fn, nn.Module) else fn  # not its hooks: a re-embedding would widen the row
        return fn(x.view(1, -1)).view(-1).double()
    if kind == "keep":
        return x.clone()
    if kind == "zeros_only" or (kind == "dropout" and training and (payload is None or payload > 0)):
        return torch.where(x == 0, x, nan)
    if kind == "dropout":
        return x.clone()
    if kind == "gather":
        return x[torch.tensor(payload, dtype=torch.long)]
    if kind == "reembed":
        return torch.cat([x, x.new_zeros(1)])[torch.tensor(payload, dtype=torch.long)]
    if kind == "cat":
        return torch.cat(inputs)
    if kind == "cat_other":
        return torch.where((torch.stack(inputs) == x).all(0), x, nan)
    if kind == "elementwise":
        op, args = payload
        values = [None if a is None else inputs[a[1]] if a[0] == "operand" else a[1] for a in args]
        if any(v is None for v in values):
            return nan
        return op(*values) if len(values) == 2 else nan
    raise AssertionError(f"unknown step kind {kind}")


def _union(sets: Iterable[frozenset | None]) -> frozenset | None:
    sets = list(sets)
    return None if any(x is None for x in sets) else frozenset().union(*sets)


def _producer_step(step: _Step, inputs: list[list]) -> list:
    """`input_producers` through one step: per output position, the producers whose values reach it."""
    kind, x = step.kind, inputs[0] if inputs else None
    if kind in ("new", "opaque"):
        return [None] * len(step.slots)
    if kind == "produce":
        return [frozenset({(step.payload, c)}) for c in range(len(step.slots))]
    if kind in ("norm", "apply", "keep", "zeros_only", "dropout"):  # within each channel
        return list(x)
    if kind == "gather":
        return [x[i] for i in step.payload]
    if kind == "reembed":  # the zero channel has no producer
        return [x[i] if i < len(x) else frozenset() for i in step.payload]
    if kind == "cat":
        return [p for part in inputs for p in part]
    if kind == "cat_other":
        return [_union(at) for at in zip(*inputs)]
    if kind == "elementwise":
        operands = [inputs[a[1]] for a in step.payload[1] if a is not None and a[0] == "operand"]
        return [_union(at) for at in zip(*operands)]
    raise AssertionError(f"unknown step kind {kind}")


class _Value:
    """A node's real output, and for channel tensors the slot of each position along dim 1 (or, for the tuple a
    split returns, the positions of each piece; or, while a layout op has split the channels over several dimensions,
    the channel of each element of the output, as positions of `source`'s channels)."""

    __slots__ = ("dim", "moved", "pieces", "real", "slots", "source")

    def __init__(self, real: object, slots=None, pieces=None, source: fx.Node | None = None, moved=None, dim=1) -> None:
        self.real, self.slots, self.pieces, self.source, self.moved = real, slots, pieces, source, moved
        self.dim = dim  # the dimension the slots lie along: 1, or the last one of a channels-last tensor


class _Walker:
    """Runs the traced graph once on the example input, mapping channels node by node."""

    def __init__(self, graph: ChannelGraph) -> None:
        self.g = graph
        self.env: dict[fx.Node, _Value] = {}
        self.modules = dict(graph.model.named_modules())

    def run(self, example_input: Tensor) -> None:
        nodes = list(self.g.fx_graph.nodes)
        placeholders = [n.name for n in nodes if n.op == "placeholder"]
        name = type(self.g.model).__name__
        if len(placeholders) != 1:
            raise GraphError(
                f"The channel graph traces forward(x) with one tensor [batch, channels, ...]; {name}.forward takes "
                f"{placeholders}. Give surgery a module whose forward takes the image batch alone (unpack dicts "
                "or extra inputs in training_step)."
            )
        if not isinstance(example_input, Tensor) or example_input.dim() < 2:
            raise GraphError(
                f"The channel graph traces {name}.forward with one tensor [batch, channels, ...], and the example "
                f"input is {describe(example_input)}. {HINT}"
            )
        for node in nodes:
            try:
                self.env[node] = self.visit(node, example_input)
                if self.env[node].dim != 1:
                    self.g.channel_dims[node.name] = self.env[node].dim
            except GraphError:
                raise
            except Exception as error:  # noqa: BLE001 - the model itself failed on the example: say on what
                raise GraphError(
                    f"{name}.forward fails on the example input ({describe(example_input)}) at {_where(node)}: "
                    f"{type(error).__name__}: {error}. The channel graph traces forward(x) with the image batch "
                    "alone: if forward takes a dict or a tuple, unpack it in training_step instead."
                ) from error

    def real(self, arg: object) -> object:
        return fx.node.map_arg(arg, lambda n: self.env[n].real)

    def tracked(self, node: fx.Node) -> list[fx.Node]:
        """The node's arguments that carry channels (or pieces of them)."""
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), found.append)
        return [n for n in dict.fromkeys(found)
                if any(v is not None for v in (self.env[n].slots, self.env[n].pieces, self.env[n].moved))]  # fmt: skip

    def fail(self, node: fx.Node, why: str) -> GraphError:
        return GraphError(
            f"The channel graph cannot follow {_where(node)}: {why}. Surgery refuses the model rather than risk a "
            "wrong slice. Teach it that op or module: register_rule(<its module class or function>, Rule.ELEMENTWISE "
            "/ KEEPS_CONSTANTS / ZEROS_ONLY / EVAL_IDENTITY / MIXES_CHANNELS, or OPAQUE for a block such as attention "
            "whose inputs and outputs may all stay) from lightning_selfcompress; else leave this model out of surgery."
        )

    def add_step(self, node: fx.Node, kind: str, sources: list[fx.Node], slots: list[int], payload=None) -> list[int]:
        self.g.steps.append(_Step(node.name, kind, [s.name for s in sources], slots, payload))
        return slots

    def visit(self, node: fx.Node, example_input: Tensor) -> _Value:
        if node.op == "placeholder":
            slots = self.g.new_slots(example_input.shape[1], pin="reaches the model's input")
            self.add_step(node, "new", [], slots)
            return _Value(example_input, slots)
        if node.op == "get_attr":
            value = self.g.model
            for part in str(node.target).split("."):
                value = getattr(value, part)
            return _Value(value)
        if node.op == "output":
            for n in self.tracked(node):
                self.g.pin(self.env[n].slots or [], "reaches the model's output")
                self.g._output_slots += self.env[n].slots or []
            return _Value(None)
        args, kwargs = self.real(node.args), self.real(node.kwargs)
        if node.op == "call_module":
            real = self.modules[node.target](*args, **kwargs)
        elif node.op == "call_function":
            real = node.target(*args, **kwargs)
        else:
            real = getattr(args[0], node.target)(*args[1:], **kwargs)
        try:
            return self.follow(node, real)
        except GraphError:
            if self.g.strict:
                raise
            return self.unknown(node, real)

    def follow(self, node: fx.Node, real: object) -> _Value:
        tracked = self.tracked(node)
        if not self.g.strict and node.op == "call_module" and isinstance(self.modules[node.target], PRODUCERS):
            tracked = tracked or self.track_anew(node.args[0])
        if not tracked or op_name(node) in NON_TENSOR_OPS:
            return _Value(real)
        target = self.modules[node.target] if node.op == "call_module" else node.target
        if node.op != "call_method" and rule_of(target) is Rule.OPAQUE:
            return self.opaque(node, real, tracked, f"read whole by '{node.name}' (its registered rule)")
        if node.op == "call_module":
            module = self.modules[node.target]
            slots = self.module(node, module, real, tracked)
            if (gather := reembedding_of(module)) is not None:  # lenient mode (strict refuses it)
                slots = self.reembed(node, slots, gather.tolist())
            return _Value(real, slots, dim=self.env[tracked[0]].dim)  # a module keeps its input's channel dim
        return self.function(node, real, tracked)

    def unknown(self, node: fx.Node, real: object) -> _Value:
        """Lenient mode: what the walker cannot follow writes new channels that nothing is known of (size accounting
        then counts the layers that read them whole)."""
        if not isinstance(real, Tensor) or real.dim() < 2:
            return _Value(real)
        return _Value(real, self.add_step(node, "new", [], self.g.new_slots(real.shape[1])))

    def track_anew(self, arg: object) -> list[fx.Node]:
        """Lenient mode: a layer's input that lost its channels upstream gets new ones, so the layer is recorded."""
        if not isinstance(arg, fx.Node) or not isinstance(self.env[arg].real, Tensor):
            return []
        self.env[arg] = self.unknown(arg, self.env[arg].real)
        return [arg] if self.env[arg].slots is not None else []

    def single(self, node: fx.Node, tracked: list[fx.Node]) -> fx.Node:
        if len(tracked) > 1 or not node.args or node.args[0] is not tracked[0]:
            raise self.fail(node, "channels reach it through an argument other than the first")
        return tracked[0]

    def module(self, node: fx.Node, module: nn.Module, real: object, tracked: list[fx.Node]) -> list[int]:
        g, source = self.g, self.single(node, tracked)
        if reembedding_of(module) is not None and self.g.strict:
            raise self.fail(node, "its channels were cut from a residual branch already; trace the model before "
                            "surgery and replay the history on it (Surgeon.replay, load_compressed)")
        slots = self.env[source].slots
        if self.env[source].moved is not None:
            raise self.fail(node, "channels are moved out of dim 1 or mixed with each other")
        if slots is None:
            raise self.fail(node, "a module applied to a tuple of tensors")
        if isinstance(module, PRODUCERS):
            return self.produce(node, module, source, real)
        if (rule := rule_of(module)) is not None:
            return self.ruled(node, rule, source, slots, node.target, getattr(module, "p", None))
        if isinstance(module, nn.LayerNorm):  # over the last dims: channels in any dimension
            return self.normalise_last(node, source, len(module.normalized_shape), f"'{node.target}'")
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:  # one slope for every value
            return self.add_step(node, "apply", [source], slots, node.target)
        dim = self.env[source].dim
        if dim != 1 and not isinstance(module, nn.Flatten):
            raise self.fail(node, f"a {type(module).__name__} on channels in dim {dim} (it reads them in dim 1)")
        if isinstance(module, (*NORMS, nn.GroupNorm, nn.PReLU)):
            if channels_of(module) != len(slots):
                raise self.fail(node, f"{channels_of(module)} channels in the module, {len(slots)} reach it")
            g.record("members", node.target, slots)
        if isinstance(module, NORMS) or one_channel_per_group(module):  # each channel normalised on its own
            return self.add_step(node, "norm", [source], slots, node.target)
        if isinstance(module, nn.GroupNorm):
            g.pin(slots, f"normalised across channels by '{node.target}'")
            return self.add_step(node, "opaque", [source], slots)
        if isinstance(module, nn.PReLU):  # a slope per channel, sliced with the group
            return self.add_step(node, "apply", [source], slots, node.target)
        if isinstance(module, nn.modules.pooling._AvgPoolNd):
            padded = any(p != 0 for p in _as_tuple(module.padding)) and module.count_include_pad
            return self.add_step(node, "zeros_only" if padded else "keep", [source], slots)
        if isinstance(module, nn.Flatten):
            return self.layout(node, source, module)[0]
        raise self.fail(node, f"it does not know how {type(module).__name__} treats channels")

    def normalise_last(self, node: fx.Node, source: fx.Node, count: int, by: str) -> list[int]:
        """A normalisation over the last `count` dims: across the channels if they lie among them."""
        value = self.env[source]
        if value.dim >= value.real.dim() - count:
            self.g.pin(value.slots, f"normalised across channels by {by}")
        return self.add_step(node, "opaque", [source], value.slots)

    def ruled(self, node: fx.Node, rule: Rule, source: fx.Node, slots: list[int], apply: object, p=None) -> list[int]:
        """A module or function followed by its rule (core/rules.py): `apply` computes an ELEMENTWISE one on a
        tensor, `p` is an EVAL_IDENTITY one's drop probability where it has one."""
        if rule in (Rule.KEEPS_CONSTANTS, Rule.ZEROS_ONLY) and self.env[source].dim != 1:
            raise self.fail(node, f"a {rule.name} op on channels in dim {self.env[source].dim} (it reads dim 1)")
        if rule is Rule.MIXES_CHANNELS:
            self.g.pin(slots, f"read across channels by '{node.name}' (its registered rule)")
        dropout = rule is Rule.EVAL_IDENTITY and isinstance(p, (int, float))
        payload = apply if rule is Rule.ELEMENTWISE else p if dropout else None
        return self.add_step(node, rule.value, [source], slots, payload)

    def opaque(self, node: fx.Node, real: object, tracked: list[fx.Node], why: str) -> _Value:
        """Every channel it reads stays, and what it writes are new channels that stay too: along the dim its first
        input had them in, if the result has as many dims; else untracked (a residual add tracks them again)."""
        for n in tracked:
            value = self.env[n]
            source = self.env[value.source] if value.source is not None else value
            self.g.pin(value.slots or source.slots or [], why)
        first = self.env[tracked[0]]
        if not isinstance(real, Tensor) or not isinstance(first.real, Tensor) or real.dim() != first.real.dim():
            return _Value(real)
        dim = first.dim
        slots = self.g.new_slots(real.shape[dim], pin=f"written by '{node.name}'")
        return _Value(real, self.add_step(node, "new", [], slots), dim=dim)

    def produce(self, node: fx.Node, module: nn.Module, source: fx.Node, real: Tensor) -> list[int]:
        g, x, slots = self.g, self.env[source].real, self.env[source].slots
        dim = self.env[source].dim
        if isinstance(module, nn.Linear):
            if dim != x.dim() - 1:
                raise self.fail(node, f"a Linear on a {x.dim()}-D input whose channels are in dim {dim}, not the last")
            in_features, out_features = module.in_features, module.out_features
        elif dim != 1:
            raise self.fail(node, f"a convolution on channels in dim {dim} (it reads them in dim 1)")
        else:
            in_features, out_features = module.in_channels, module.out_channels
        if len(slots) != in_features:
            raise self.fail(node, f"{len(slots)} channels reach a layer with {in_features} inputs")
        outputs = g.new_slots(out_features)
        g.record("inputs", node.target, slots)
        g.record("outputs", node.target, outputs)
        g.consumers.setdefault(node.target, []).append(source.name)
        g.spatial[node.target] = g.spatial.get(node.target, 0) + real[0].numel() // out_features
        if is_grouped(module):  # the inputs and outputs of one convolution group go together (depthwise: 1 input)
            in_per, out_per = in_features // module.groups, out_features // module.groups
            for k in range(module.groups):
                members = slots[k * in_per : (k + 1) * in_per] + outputs[k * out_per : (k + 1) * out_per]
                g.tie(members[:1] * (len(members) - 1), members[1:])
        return self.add_step(node, "produce", [source], outputs, node.target)

    def function(self, node: fx.Node, real: object, tracked: list[fx.Node]) -> _Value:
        name = op_name(node)
        if any(self.env[n].moved is not None for n in tracked):
            if name not in MOVES or len(tracked) > 1:
                raise self.fail(node, "channels are moved out of dim 1 or mixed with each other")
            return self.follow_move(node, real, self.single(node, tracked))
        if name == "getitem" and self.env[tracked[0]].pieces is not None:  # one piece of a split/chunk
            split = self.env[tracked[0]]
            return _Value(real, self.gather(node, split.source, split.pieces[node.args[1]]), dim=split.dim)
        if name in ("cat", "concat"):
            return self.concat(node, real, tracked)
        if name in ELEMENTWISE:
            return _Value(real, self.elementwise(node, real, tracked), dim=self.env[tracked[0]].dim)
        source = self.single(node, tracked)
        slots, dim = self.env[source].slots, self.env[source].dim
        if slots is None:
            raise self.fail(node, "an op applied to a tuple of tensors")
        if (rule := rule_of(node.target)) is not None:
            fn = node.target if node.op == "call_function" else getattr(torch.Tensor, name)
            rest = self.real(node.args[1:])
            kwargs = {k: v for k, v in self.real(node.kwargs).items() if k != "inplace"}
            p = kwargs.get("p", rest[0] if rest else None)
            slots = self.ruled(node, rule, source, slots, lambda c: fn(c, *rest, **kwargs), p)
            return _Value(real, slots, dim=dim)
        if name == "layer_norm":  # F.layer_norm(x, normalized_shape, ...)
            slots = self.normalise_last(node, source, len(self.real(node.args[1])), f"node '{node.name}'")
            return _Value(real, slots, dim=dim)
        if name in LAYOUT_OPS:
            if name in ("mean", "amax", "amin") and dim in _reduced_dims(node, self.env[source].real):
                raise self.fail(node, "a reduction over the channel dimension")
            if name in ("split", "chunk"):
                pieces = [self.positions(node, p)[0] for p in self.run_on_ids(node, source)]
                self.keep_pieces_apart(node, source, pieces)
                return _Value(real, pieces=pieces, source=source, dim=dim)
            ids = self.run_on_ids(node, source)
            if name in MOVES and len(_channel_dims(ids)) > 1:
                return self.move_out(node, real, source, ids)
            slots, dim = self.layout(node, source, ids=ids)
            return _Value(real, slots, dim=dim)
        raise self.fail(node, f"'{name}' is not an op it knows")

    def move_out(self, node: fx.Node, real: Tensor, source: fx.Node, ids: Tensor) -> _Value:
        """Channels leave dim 1 (a permute, or a view that splits them, as a channel shuffle does): follow them until
        a layout op brings them back. A split must split the same way after a cut: one of its sizes is computed at
        run time, and along the sizes written into the code, the channels at the same place go together."""
        dims, slots = _channel_dims(ids), self.env[source].slots
        if len(dims) > 1:
            sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            first = self.env[source].dim
            split = dims == list(range(first, first + len(dims))) and len(sizes) == ids.dim()
            if op_name(node) not in ("view", "reshape") or not split:
                raise self.fail(node, "channels are moved out of dim 1 or mixed with each other")
            literal = [type(sizes[d]) is int and sizes[d] != -1 for d in dims]
            if all(literal):
                self.g.pin(slots, f"split into fixed sizes by node '{node.name}'")
            elif not any(literal):
                raise self.fail(node, "channels are split into sizes that are all computed at run time")
            grid = ids[tuple(slice(None) if d in dims else 0 for d in range(ids.dim()))].long()
            for k in (k for k, fixed in enumerate(literal) if fixed):
                base = [slots[i] for i in grid.select(k, 0).flatten().tolist()]
                for t in range(1, grid.shape[k]):
                    self.g.tie(base, [slots[i] for i in grid.select(k, t).flatten().tolist()])
        return _Value(real, source=source, moved=ids)

    def follow_move(self, node: fx.Node, real: Tensor, source: fx.Node) -> _Value:
        value = self.env[source]
        ids = self.run_on_ids(node, source, ids=value.moved)
        dims = _channel_dims(ids)
        if len(dims) == 1:  # along one dimension again
            positions, dim = self.positions(node, ids)
            return _Value(real, self.gather(node, value.source, positions), dim=dim)
        if len(dims) > len(_channel_dims(value.moved)):
            raise self.fail(node, "channels are split again while out of dim 1")
        return _Value(real, source=value.source, moved=ids)

    def elementwise(self, node: fx.Node, real: object, tracked: list[fx.Node]) -> list[int]:
        if not isinstance(real, Tensor) or real.dim() < 2:
            raise self.fail(node, "an elementwise op without a channel dimension in its result")
        if node.kwargs:
            raise self.fail(node, f"an elementwise op with keyword arguments {sorted(node.kwargs)}")
        dim = self.env[tracked[0]].dim
        if any(self.env[n].dim != dim or self.env[n].real.dim() != real.dim() for n in tracked if self.env[n].slots):
            raise self.fail(node, "an elementwise op on tensors whose channels lie in different dimensions")
        width, operands, payload, pinned = real.shape[dim], [], [], []
        for arg in node.args:
            if isinstance(arg, fx.Node) and arg in tracked:
                slots = self.env[arg].slots
                if slots is None or len(slots) not in (width, 1) or (len(slots) == 1 and width != 1):
                    if slots is not None and len(slots) == 1:  # one channel broadcast over all: keep it whole
                        self.g.pin(slots, f"broadcast over channels at node '{node.name}'")
                        payload.append(None)
                        continue
                    raise self.fail(node, f"operands of {len(slots or [])} and {width} channels")
                payload.append(("operand", len(operands)))
                operands.append(arg)
                continue
            other = self.real(arg)
            channel_dim = dim - (real.dim() - other.dim()) if isinstance(other, Tensor) else -1
            if channel_dim >= 0 and other.shape[channel_dim] != 1:  # a tensor it cannot slice: those channels stay
                pinned.append(f"scaled by a per-channel tensor it cannot slice at node '{node.name}'")
            payload.append(("value", other) if isinstance(other, (int, float)) else None)
        slots = self.env[operands[0]].slots
        for reason in pinned:
            self.g.pin(slots, reason)
        for other in operands[1:]:
            self.g.tie(slots, self.env[other].slots)
        return self.add_step(node, "elementwise", operands, list(slots), (ELEMENTWISE[op_name(node)], payload))

    def concat(self, node: fx.Node, real: Tensor, tracked: list[fx.Node]) -> _Value:
        parts = node.args[0] if node.args else node.kwargs["tensors"]
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % real.dim()
        channel_dim = self.env[tracked[0]].dim
        if any(not isinstance(t, fx.Node) or self.env[t].slots is None for t in parts):
            if dim == channel_dim or len(tracked) > 1:
                raise self.fail(node, "a concatenation of channel tensors with other tensors")
            # along another dim (a class token before the patches): rows the channels cannot be sliced in
            return self.opaque(node, real, tracked, f"concatenated with a tensor it does not track at '{node.name}'")
        if len({self.env[t].dim for t in parts}) > 1:
            raise self.fail(node, "a concatenation of tensors whose channels lie in different dimensions")
        if dim == channel_dim:
            return _Value(real, self.add_step(node, "cat", list(parts), [s for t in parts for s in self.env[t].slots]),
                          dim=channel_dim)  # fmt: skip
        first = self.env[parts[0]].slots
        for t in parts[1:]:
            if len(self.env[t].slots) != len(first):
                raise self.fail(node, "a concatenation along another dimension of tensors with different channels")
            self.g.tie(first, self.env[t].slots)
        return _Value(real, self.add_step(node, "cat_other", list(parts), list(first)), dim=channel_dim)

    def run_on_ids(
        self, node: fx.Node, source: fx.Node, module: nn.Module | None = None, ids: Tensor | None = None
    ) -> object:
        """Run the node's op on a tensor of the source's shape whose every element is its channel index (or `ids`)."""
        x, dim = self.env[source].real, self.env[source].dim
        if ids is None:
            ids = torch.arange(x.shape[dim], dtype=torch.float64).view([1] * dim + [-1] + [1] * (x.dim() - dim - 1))
        ids = torch.empty_like(x, dtype=torch.float64).copy_(ids)  # laid out as x: a view that works on x works here
        if module is not None:
            return module(ids)
        args, kwargs = (
            fx.node.map_arg(a, lambda n: ids if n is source else self.env[n].real) for a in (node.args, node.kwargs)
        )
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def layout(
        self, node: fx.Node, source: fx.Node, module: nn.Module | None = None, ids: object = None
    ) -> tuple[list[int], int]:
        """(slots, the dim they lie along) of a layout op's result."""
        ids = self.run_on_ids(node, source, module) if ids is None else ids
        positions, dim = self.positions(node, ids)
        slots = self.gather(node, source, positions)
        width = len(slots)
        literals: list[object] = []
        fx.node.map_aggregate(node.args[1:], literals.append)
        if width > 1 and width in [v for v in literals if type(v) is int]:  # e.g. x.view(n, 576): fixed width
            self.g.pin(slots, f"given a fixed width ({width}) by node '{node.name}'")
        return slots, dim

    def keep_pieces_apart(self, node: fx.Node, source: fx.Node, pieces: list[list[int]]) -> None:
        """After a cut the op must cut the same pieces: sizes written into the code (`split([4, 2])`) fix them, so
        their channels stay; equal pieces of a size computed at run time (`chunk(2)`) lose the same positions."""
        slots, x = self.env[source].slots, self.env[source].real
        split_dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if split_dim % x.dim() != self.env[source].dim:  # each piece holds every channel
            return
        named = [node.kwargs[k] for k in ("split_size_or_sections", "chunks") if k in node.kwargs]
        sizes = node.args[1] if len(node.args) > 1 else named[0] if named else None
        fixed = op_name(node) == "split" and not isinstance(sizes, fx.Node)
        if fixed or len({len(p) for p in pieces}) > 1:
            self.g.pin([slots[i] for p in pieces for i in p], f"split into fixed sizes by node '{node.name}'")
            return
        for piece in pieces[1:]:
            self.g.tie([slots[i] for i in pieces[0]], [slots[i] for i in piece])

    def reembed(self, node: fx.Node, slots: list[int], gather: list[int]) -> list[int]:
        """A branch's output re-embedded at the stream's width (core/reembed.py): its channels, and zeros."""
        padded = slots + self.g.new_slots(1)
        return self.add_step(node, "reembed", [node], [padded[i] for i in gather], gather)

    def gather(self, node: fx.Node, source: fx.Node, positions: list[int]) -> list[int]:
        slots = [self.env[source].slots[p] for p in positions]
        return self.add_step(node, "gather", [source], slots, positions)

    def positions(self, node: fx.Node, out: object) -> tuple[list[int], int]:
        """(the channel at each index of the one dimension along which the channels lie, that dimension)."""
        if not isinstance(out, Tensor) or out.dim() < 2:
            raise self.fail(node, "its result has no channel dimension (dim 1)")
        dims = _channel_dims(out) or [1]  # one channel: it stays where it was
        if len(dims) > 1 or dims[0] == 0:
            raise self.fail(node, "channels are moved out of dim 1 or mixed with each other")
        line = out[tuple(slice(None) if d == dims[0] else 0 for d in range(out.dim()))]
        return line.long().tolist(), dims[0]


def _channel_dims(ids: object) -> list[int]:
    """The dimensions along which a tensor of channel indices varies."""
    if not isinstance(ids, Tensor) or ids.numel() == 0:
        return []
    return [d for d in range(ids.dim()) if ids.shape[d] > 1 and not bool((ids == ids.narrow(d, 0, 1)).all())]


def _reduced_dims(node: fx.Node, x: Tensor) -> set[int]:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return set(range(x.dim()))
    return {d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)}


def _as_tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
