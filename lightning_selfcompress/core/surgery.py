"""Removing channel groups from a model in place, optimizer state included, and deciding which groups are dead.

A removal is planned in full (every new tensor computed) before anything is assigned, so a surgery either completes
or leaves the model and the optimizers as they were. Parameters keep their identity (`param.data = ...`), so the
optimizer, LR schedulers and user references stay valid; every optimizer state tensor of a parameter's old shape is
sliced the way the parameter is (momentum, Adam moments, max_exp_avg_sq, ...), scalar state such as `step` stays,
and gradients are sliced too.

The dead-channel rule (Self-Compressing Neural Networks, section 3): a group may go when every producer's channel is
at 0 bits (its weights are exact zeros, so it emits its bias) and what that constant becomes on the way to each
consumer, in train mode and in eval mode, is zero, or is one and the same constant that the consumer folds exactly
into its bias (a Linear, or a convolution without padding, so that every output sees the whole kernel).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .groups import ChannelGraph, GraphError, channels_of, is_grouped
from .quant import QuantizationConfig, attach_quantizers
from .sparsity import MASK

__all__ = ["Removal", "Surgeon", "SurgeryRecord", "load_compressed", "SURGEON_STATE_KEY"]

SURGEON_STATE_KEY = "ChannelSurgeon"  # where a Lightning checkpoint keeps the surgeon's state


@dataclass
class Removal:
    """Groups chosen for removal, and the bias corrections that keep the function exact (per consumer module)."""

    groups: Tensor  # bool mask over the graph's groups
    folds: dict[str, Tensor] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.groups.sum())


@dataclass
class SurgeryRecord:
    """One surgery, in original indexing: each removed group named by its first producer's (module, channel)."""

    step: int
    groups: list[tuple[str, int]]
    channels: dict[str, int]  # output channels removed per producer module
    weights_removed: int
    seconds: float

    def to_dict(self) -> dict:
        return {
            "step": self.step,
            "groups": [list(g) for g in self.groups],
            "channels": dict(self.channels),
            "weights_removed": self.weights_removed,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SurgeryRecord:
        return cls(int(d["step"]), [(str(m), int(c)) for m, c in d["groups"]], dict(d["channels"]),
                   int(d["weights_removed"]), float(d["seconds"]))  # fmt: skip


def _quantized_bits(module: nn.Module) -> Tensor | None:
    quantizer = getattr(module, "weight_quantizer", None)
    return None if quantizer is None else quantizer.bits


def _effective_weight(module: nn.Module) -> Tensor:
    quantizer = getattr(module, "weight_quantizer", None)
    return module.weight if quantizer is None else quantizer(module.weight)


def _folds_into_bias(module: nn.Module) -> bool:
    """A constant input channel adds the same amount to every output of this layer."""
    if module.bias is None:
        return False
    if isinstance(module, nn.Linear):
        return True
    padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
    return module.groups == 1 and not isinstance(module.padding, str) and all(p == 0 for p in padding)


class Surgeon:
    """Finds dead channel groups of a traced model and removes them, in place, from the model and its optimizers."""

    def __init__(self, graph: ChannelGraph, atol: float = 0.0, round_to: int = 1) -> None:
        self.check_options(atol, round_to)
        self.graph = graph
        self.atol = atol
        self.round_to = round_to
        self.history: list[SurgeryRecord] = []

    @staticmethod
    def check_options(atol: float, round_to: int) -> None:
        if not atol >= 0:
            raise ValueError(f"atol={atol} must be >= 0 (0: constants must be exactly zero or exactly foldable).")
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to={round_to!r} must be a positive integer (8 suits tensor cores, 1: any width).")

    # ---- the dead-channel rule -----------------------------------------------------------------------------------

    def _dead_outputs(self) -> dict[str, Tensor | None]:
        """Per producer, per original output channel: are its weights exact zeros (bits <= 0)? None for a producer
        that is not quantized. One transfer from the device for all layers."""
        g = self.graph
        bits = {name: _quantized_bits(g.model.get_submodule(name)) for name in g.outputs}
        quantized = {name: b for name, b in bits.items() if b is not None}
        dead: dict[str, Tensor | None] = dict.fromkeys(bits)
        if not quantized:
            return dead
        flat = torch.cat([b.detach().reshape(-1) for b in quantized.values()]).cpu() <= 0
        for (name, b), part in zip(quantized.items(), flat.split([b.numel() for b in quantized.values()])):
            groups = g.outputs[name]
            dead[name] = torch.ones(len(groups), dtype=torch.bool)
            dead[name][~g.removed[groups]] = part
        return dead

    def dead_groups(self, dead: dict[str, Tensor | None] | None = None) -> Tensor:
        """Groups not yet removed whose every producer channel is at 0 bits (the L1 pull acts on these)."""
        g = self.graph
        dead = self._dead_outputs() if dead is None else dead
        alive = g.removed.clone()
        has_producer = torch.zeros(g.num_groups, dtype=torch.bool)
        for name, groups in g.outputs.items():
            has_producer[groups] = True
            alive[groups[~dead[name]] if dead[name] is not None else groups] = True
        return has_producer & ~alive & ~g.removed & ~g.pinned_mask

    @torch.no_grad()
    def pull_constants(self, amount: float) -> int:
        """The paper's L1 pull on what a dead channel still emits, as a proximal step: shrink producer biases and
        norm shifts of dead groups by `amount` towards zero, stopping at zero. Returns how many groups are dead."""
        g = self.graph
        dead = self.dead_groups()
        if dead.any():
            for table in (g.outputs, g.members):
                for name, where in self._positions(table, dead):
                    bias = getattr(g.model.get_submodule(name), "bias", None)
                    if isinstance(bias, Tensor) and bias.dim() == 1 and len(bias) == len(where):
                        where = where.to(bias.device)
                        chosen = bias.data[where]
                        bias.data[where] = chosen.sign() * (chosen.abs() - amount).clamp_min(0)
        return int(dead.sum())

    @torch.no_grad()
    def settle_statistics(self) -> int:
        """Set the running statistics of dead channels to the limits their running averages approach: the
        channel's constant as the mean, zero variance. In eval mode such a channel then emits the norm's shift, as
        in train mode, so the two modes agree and the constant can be removed or folded exactly. This changes the
        eval-mode output slightly (as the running averages would have, given time); run it before a surgery, not
        inside one. Returns the number of channels settled."""
        g = self.graph
        outputs = self._dead_outputs()
        dead = self.dead_groups(outputs)
        if not dead.any():
            return 0
        train = g.constants(True, outputs.get)
        settled = 0
        for step in g.steps:
            if step.kind != "norm":
                continue
            module = g.model.get_submodule(step.payload)
            if getattr(module, "running_mean", None) is None:
                continue
            groups = g.members[step.payload]
            present = ~g.removed[groups]
            value = train[step.sources[0]][present]
            where = dead[groups[present]] & value.isfinite()
            if where.any():
                device = module.running_mean.device
                module.running_mean[where.to(device)] = value[where].to(device, module.running_mean.dtype)
                module.running_var[where.to(device)] = 0.0
                settled += int(where.sum())
        return settled

    def _positions(self, table: dict[str, Tensor], groups: Tensor):
        """Per module of `table`: a mask over its current positions of those in `groups` (modules with none skipped)."""
        for name, original in table.items():
            where = groups[original[~self.graph.removed[original]]]
            if where.any():
                yield name, where

    @torch.no_grad()
    def find(self) -> Removal:
        """The dead groups whose removal provably leaves the network's function unchanged, in both modes."""
        g = self.graph
        g.check_unchanged()
        outputs = self._dead_outputs()
        candidates = self.dead_groups(outputs)
        if not candidates.any():
            return Removal(candidates)
        train = g.constants(True, outputs.get)
        evaluation = g.constants(False, outputs.get)
        blocked = torch.zeros(g.num_groups, dtype=torch.bool)
        folds: dict[str, tuple[Tensor, Tensor]] = {}
        for name, sources in g.consumers.items():
            module = g.model.get_submodule(name)
            groups = g.inputs[name]
            if is_grouped(module):  # a group's inputs go with its outputs, whose weights are zero: nothing reaches further
                continue
            for source in sources:
                t, e = train[source], evaluation[source]
                zero = (t.abs() <= self.atol) & (e.abs() <= self.atol)
                same = t.isfinite() & e.isfinite() & ((t - e).abs() <= self.atol)
                foldable = same & _folds_into_bias(module) & (len(sources) == 1)
                blocked[groups[~(zero | foldable)]] = True
                fold = candidates[groups] & ~zero & foldable
                if fold.any():
                    folds[name] = (fold, t)
        removable = self._fit_widths(candidates & ~blocked)
        corrections = {}
        for name, (fold, value) in folds.items():
            fold &= removable[g.inputs[name]]
            if fold.any():
                corrections[name] = self._bias_correction(name, fold, value)
        return Removal(removable, corrections)

    def _fit_widths(self, removable: Tensor) -> Tensor:
        """Give groups back until every layer keeps at least one position (PyTorch has no zero-width layers) and
        every producer whose width is a multiple of `round_to` stays one (tensor cores want multiples of 8)."""
        g = self.graph
        changed = True
        while changed:
            changed = False
            for role, table in (("outputs", g.outputs), ("inputs", g.inputs), ("members", g.members)):
                for groups in table.values():
                    present = groups[~g.removed[groups]]
                    step = self.round_to if role == "outputs" and len(present) % self.round_to == 0 else 1
                    going = present[removable[present]].tolist()
                    while going and ((left := int((~removable[present]).sum())) == 0 or left % step):
                        removable[going.pop()] = False
                        changed = True
        return removable

    def _bias_correction(self, name: str, fold: Tensor, value: Tensor) -> Tensor:
        g = self.graph
        module = g.model.get_submodule(name)
        groups = g.inputs[name]
        present = ~g.removed[groups]
        current = fold[present].nonzero().flatten()  # positions in the module's current input dimension
        constants = value[present][current].to(module.weight.device, module.weight.dtype)
        weight = _effective_weight(module).detach().index_select(1, current.to(module.weight.device))
        return weight.flatten(2).sum(2) @ constants if weight.dim() > 2 else weight @ constants

    # ---- removal -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def remove(
        self,
        removal: Removal,
        optimizers: Sequence[torch.optim.Optimizer] = (),
        step: int = 0,
        seconds: float = 0.0,
        extra_modules: Iterable[nn.Module] = (),
    ) -> SurgeryRecord:
        """Remove the groups in place from the model and every optimizer's state; append the record to the history."""
        g = self.graph
        g.check_unchanged()
        remove = removal.groups
        bad = remove & (g.removed | g.pinned_mask)
        if bad.any():
            group = int(bad.nonzero()[0])
            why = "was removed before" if g.removed[group] else f"is pinned: {g.pinned.get(group)}"
            raise GraphError(f"Cannot remove the group of {g.key(group)} (module, output channel): it {why}.")
        plan = _Plan()
        weights_before = sum(m.weight.numel() for m in _layers(g))
        channels = {}
        for name in g.modules():
            module = g.model.get_submodule(name)
            keep = {role: g.kept(groups, remove) for role, groups in g.tables(name).items()}
            if all(k is None for k in keep.values()):
                continue
            if "outputs" in keep and keep["outputs"] is not None:
                channels[name] = int(g.width(g.outputs[name]) - len(keep["outputs"]))
            plan.module(name, module, keep, removal.folds.get(name))
        plan.optimizer_state(optimizers)
        plan.apply()
        g.removed |= remove
        record = SurgeryRecord(
            step=step,
            groups=[g.key(i) for i in remove.nonzero().flatten().tolist()],
            channels={k: v for k, v in channels.items() if v},
            weights_removed=weights_before - sum(m.weight.numel() for m in _layers(g)),
            seconds=seconds,
        )
        self.history.append(record)
        return record

    def replay(self, history: Iterable[SurgeryRecord | dict]) -> None:
        """Re-apply recorded removals to a freshly built model (values come from its checkpoint afterwards)."""
        for entry in history:
            record = entry if isinstance(entry, SurgeryRecord) else SurgeryRecord.from_dict(entry)
            mask = torch.zeros(self.graph.num_groups, dtype=torch.bool)
            for module, channel in record.groups:
                try:
                    mask[self.graph.group_of(module, channel)] = True
                except GraphError as error:
                    raise GraphError(f"The surgery history does not fit this model: {error}") from error
            try:
                self.remove(Removal(mask), step=record.step, seconds=record.seconds)
            except GraphError as error:
                raise GraphError(f"The surgery history does not fit this model: {error}") from error


def _layers(graph: ChannelGraph) -> list[nn.Module]:
    return [graph.model.get_submodule(n) for n in graph.spatial]


class _Plan:
    """Every new tensor of a surgery, computed before any is assigned."""

    def __init__(self) -> None:
        self.params: list[tuple[nn.Parameter, Tensor, object]] = []  # (param, new data, slicer)
        self.buffers: list[tuple[nn.Module, str, Tensor]] = []
        self.attributes: list[tuple[nn.Module, str, int]] = []
        self.state: list[tuple[dict, str, Tensor]] = []
        self.grads: list[tuple[nn.Parameter, Tensor]] = []

    def module(self, name: str, module: nn.Module, keep: dict[str, Tensor | None], fold: Tensor | None) -> None:
        out_keep, in_keep, member_keep = keep.get("outputs"), keep.get("inputs"), keep.get("members")
        if isinstance(module, (_ConvNd, nn.Linear)):
            weight_shape = module.weight.shape
            grouped = is_grouped(module)  # whole convolution groups go: the weight's dim 1 (inputs per group) stays
            out_count = weight_shape[0]

            def slicer(t: Tensor) -> Tensor | None:
                if t.shape == weight_shape:
                    if out_keep is not None:
                        t = t.index_select(0, out_keep.to(t.device))
                    if in_keep is not None and not grouped:
                        t = t.index_select(1, in_keep.to(t.device))
                    return t
                if t.dim() == 1 and t.shape[0] == out_count:
                    return t if out_keep is None else t.index_select(0, out_keep.to(t.device))
                return None

            if fold is not None:  # fold constants into the bias before its outputs are sliced
                bias = module.bias
                self.params.append((bias, slicer(bias.detach() + fold.to(bias.dtype)), slicer))
                self._tensors(module, slicer, skip={id(bias)})
            else:
                self._tensors(module, slicer)
            new_out = out_count if out_keep is None else len(out_keep)
            new_in = (module.in_channels if isinstance(module, _ConvNd) else module.in_features)
            if in_keep is not None:
                new_in = len(in_keep)
            if isinstance(module, _ConvNd):
                if grouped:
                    self.attributes.append((module, "groups", new_in // weight_shape[1]))
                self.attributes += [(module, "out_channels", new_out), (module, "in_channels", new_in)]
            else:
                self.attributes += [(module, "out_features", new_out), (module, "in_features", new_in)]
        elif member_keep is not None:
            count = channels_of(module)

            def slicer(t: Tensor) -> Tensor | None:
                return t.index_select(0, member_keep.to(t.device)) if t.dim() >= 1 and t.shape[0] == count else None

            self._tensors(module, slicer)
            for attr in ("num_features", "num_parameters", "num_channels"):
                if hasattr(module, attr):
                    self.attributes.append((module, attr, len(member_keep)))
        else:
            raise GraphError(f"Module '{name}' ({type(module).__name__}) has channels to remove but no known layout.")

    def _tensors(self, module: nn.Module, slicer, skip: set[int] = frozenset()) -> None:
        for owner in module.modules():
            for pname, p in owner._parameters.items():
                if p is None or id(p) in skip:
                    continue
                new = slicer(p.detach())
                if new is None:
                    if p.dim() > 0:
                        raise GraphError(f"Cannot tell how to slice parameter '{pname}' {tuple(p.shape)} of {owner}.")
                    continue
                self.params.append((p, new, slicer))
            for bname, b in owner._buffers.items():
                if b is None or b.dim() == 0:
                    continue
                new = slicer(b)
                if new is None:
                    raise GraphError(f"Cannot tell how to slice buffer '{bname}' {tuple(b.shape)} of {owner}.")
                self.buffers.append((owner, bname, new))

    def optimizer_state(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        for p, _, slicer in self.params:
            if p.grad is not None:
                self.grads.append((p, slicer(p.grad)))
            for optimizer in optimizers:
                state = optimizer.state.get(p)
                if not state:
                    continue
                for key, value in state.items():
                    if isinstance(value, Tensor) and value.shape == p.shape and value.dim() > 0:
                        self.state.append((state, key, slicer(value)))

    def apply(self) -> None:
        for state, key, value in self.state:
            state[key] = value
        for p, new, _ in self.params:
            p.data = new.contiguous()
        for p, grad in self.grads:
            p.grad = grad.contiguous()
        for module, name, value in self.buffers:
            module._buffers[name] = value.contiguous()
        for module, name, value in self.attributes:
            setattr(module, name, value)


def load_compressed(model: nn.Module, checkpoint: str | Path | Mapping[str, Any], strict: bool = True) -> nn.Module:
    """Rebuild a compressed model for inference from a freshly built `model` (the module the callbacks trained,
    e.g. the LightningModule) and a checkpoint written during or after compression: replay the surgery history,
    attach quantizers and 2:4 masks where the checkpoint has them, then load the weights. Returns `model`, in eval
    mode.
    """
    if not isinstance(checkpoint, Mapping):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint '{path}' does not exist.")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state_dict = checkpoint.get("state_dict", checkpoint)
    surgeon_state = checkpoint.get("callbacks", {}).get(SURGEON_STATE_KEY, {})
    if surgeon_state.get("history"):
        example = torch.zeros(surgeon_state["input_shape"], dtype=getattr(torch, surgeon_state["input_dtype"]))
        Surgeon(ChannelGraph(model, example)).replay(surgeon_state["history"])
    quantized = sorted(k.removesuffix(".weight_quantizer.bits") for k in state_dict if k.endswith(".weight_quantizer.bits"))
    if quantized:
        config = QuantizationConfig(include=tuple(quantized))
        attach_quantizers(model, config)
    for key in (k for k in state_dict if k.endswith(f".{MASK}")):  # 2:4 masks: buffers the fresh model lacks
        owner = model.get_submodule(key.removesuffix(f".{MASK}"))
        if not isinstance(getattr(owner, MASK, None), torch.Tensor):
            owner.register_buffer(MASK, torch.ones(state_dict[key].shape, dtype=torch.bool))
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as error:
        raise RuntimeError(
            f"The checkpoint does not fit {type(model).__name__} after replaying its surgery history "
            f"({len(surgeon_state.get('history', []))} surgeries). Build the model with the same class and arguments "
            f"as the one that was trained. {error}"
        ) from error
    return model.eval()
