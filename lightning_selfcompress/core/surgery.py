"""Removing channel groups from a model in place, optimizer state included, and deciding which groups are dead.

A removal is planned in full (every new tensor computed) before anything is assigned, so a surgery either completes
or leaves the model and the optimizers as they were. Parameters keep their identity (`param.data = ...`), so the
optimizer, LR schedulers and user references stay valid; every optimizer state tensor of a parameter's old shape is
sliced the way the parameter is (momentum, Adam moments, max_exp_avg_sq, ...), a factored one along the dimensions it
keeps (Adafactor's row and column variances: the means they hold are not recomputed), scalar state such as `step`
stays, and gradients are sliced too. An optimizer whose state is not per parameter (LBFGS's flat history over all
of them) is refused.

The dead-channel rule (Self-Compressing Neural Networks, section 3): a group may go when every producer's channel is
at 0 bits (its weights are exact zeros, so it emits its bias) and what that constant becomes on the way to each
consumer, in train mode and in eval mode, is zero, or is one and the same constant that the consumer folds exactly
into its bias (a Linear, or a convolution without padding, so that every output sees the whole kernel).
A channel may also leave one residual branch alone, the stream it is added to keeping it: when the branch's
producer channel is at 0 bits and the branch adds exactly zero for it, in both modes (core/reembed.py).
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .atomic import atomic_path
from .checkpoint import read_checkpoint
from .folded_steps import attach_folded_steps
from .groups import ChannelGraph, Cuts, GraphError, channels_of, is_grouped
from .ops import leaf_trace, one_channel_per_group
from .quant import (
    QuantizationConfig,
    attach_activation_quantizers,
    attach_quantizers,
    check_patterns,
    check_patterns_match,
    selected,
    share_input_steps,
)
from .reembed import GATHER, set_reembedding
from .residual_steps import attach_residual_steps
from .sparsity import DROPPED, MASK

__all__ = ["Removal", "Surgeon", "SurgeryRecord", "check_optimizer", "load_compressed", "save_compressed",
           "SURGERY_KEY"]

SURGERY_KEY = "surgery"  # where a checkpoint keeps `Surgeon.state_dict()`: save_compressed's and ChannelSurgeon's alike


@dataclass
class Removal:
    """Groups chosen for removal, channels leaving a residual branch alone, and the bias corrections that keep the
    function exact (per consumer module)."""

    groups: Tensor  # bool mask over the graph's groups
    folds: dict[str, Tensor] = field(default_factory=dict)
    cuts: dict[str, Tensor] = field(default_factory=dict)  # per branch producer: original positions

    @property
    def count(self) -> int:
        """The channels this removal takes out: whole groups, and channels leaving a branch alone."""
        return int(self.groups.sum()) + sum(int(c.sum()) for c in self.cuts.values())


@dataclass
class SurgeryRecord:
    """One surgery, in original indexing: each removed group named by its first producer's (module, channel), and
    the channels that left a residual branch alone, per branch producer."""

    step: int
    groups: list[tuple[str, int]]
    channels: dict[str, int]  # output channels removed per producer module
    weights_removed: int
    seconds: float
    branches: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """As JSON-ready data: the history in a checkpoint and in the run's report."""
        return {
            "step": self.step,
            "groups": [list(g) for g in self.groups],
            "branches": {k: list(v) for k, v in self.branches.items()},
            "channels": dict(self.channels),
            "weights_removed": self.weights_removed,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SurgeryRecord:
        """The record `to_dict` wrote."""
        return cls(int(d["step"]), [(str(m), int(c)) for m, c in d["groups"]], dict(d["channels"]),
                   int(d["weights_removed"]), float(d["seconds"]),
                   {str(k): [int(i) for i in v] for k, v in d.get("branches", {}).items()})  # fmt: skip


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose state the surgeon cannot slice (raises ValueError)."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            "ChannelSurgeon cannot cut channels under torch.optim.LBFGS: its history (directions, steps, the last "
            "gradient) is one flat vector over all parameters, not state per parameter. Use a per-parameter "
            "optimizer (SGD, Adam, AdamW, ...) with the surgeon, or train with LBFGS without it (surgery=none)."
        )


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

    def __init__(
        self,
        graph: ChannelGraph,
        atol: float = 0.0,
        round_to: int = 1,
        widths: Mapping[str, Collection[int]] | None = None,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
    ) -> None:
        """`widths`: per producer, the output widths it may be cut to (the steps of its latency table,
        `core.widths`); a cut to any other width waits, dead channels kept as zeros, until enough have died.
        `include`/`exclude`: glob patterns on module names; only the dead channels of the layers they pick are cut
        (a channel group with another producer too is cut only when every producer of it is picked)."""
        self.check_options(atol, round_to)
        self.include, self.exclude = check_patterns("include", include), check_patterns("exclude", exclude)
        check_patterns_match(graph.model, self.include, self.exclude)
        self.graph = graph
        self.atol = atol
        self.round_to = round_to
        self.widths = {name: set(allowed) for name, allowed in (widths or {}).items()}
        self._check_widths()
        self.history: list[SurgeryRecord] = []
        self.cuts = Cuts(graph)  # what this surgeon removed: the graph itself stays as traced

    def _width_ok(self, producer: str, width: int, was: int) -> bool:
        """May the producer's outputs go from `was` to `width` channels (round_to, and its latency steps)?"""
        step = self.round_to if was % self.round_to == 0 else 1
        allowed = self.widths.get(producer)
        return width > 0 and width % step == 0 and (allowed is None or width in allowed or width == was)

    def _check_widths(self) -> None:
        """Steps that do not fit the traced model (a layer it lacks; none at a layer's width, where every table
        ends) are stale: timed for another model, or saved in another run's checkpoint."""
        for name, allowed in self.widths.items():
            width = len(self.graph.outputs[name]) if name in self.graph.outputs else None
            if width not in allowed:
                where = f"has {width} output channels" if width else "is not a layer whose channels can be cut here"
                raise ValueError(
                    f"The latency steps for '{name}' ({sorted(allowed)}) are stale: '{name}' {where}. They were "
                    "measured for another model (a checkpoint's `latency_steps` from another run?); resume from this "
                    "model's own checkpoint, or start the run anew to time its tables."
                )

    @staticmethod
    def check_options(atol: float, round_to: int) -> None:
        """Refuse an `atol` or `round_to` that cannot work, naming it."""
        if not atol >= 0:
            raise ValueError(f"atol={atol} must be >= 0 (0: constants must be exactly zero or exactly foldable).")
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f"round_to={round_to!r} must be a positive integer (8 suits tensor cores, 1: any width).")

    # ---- the dead-channel rule -----------------------------------------------------------------------------------

    def producer_bits(self) -> dict[str, Tensor | None]:
        """Per producer, its bit depths (the quantizer's parameter, one per present output channel); None where it
        is not quantized or not picked by include/exclude: its channels are never dead."""
        return {
            name: _quantized_bits(self.graph.model.get_submodule(name)) if selected(name, self.include, self.exclude)
            else None
            for name in self.graph.outputs
        }  # fmt: skip

    def present_groups(self) -> dict[str, Tensor]:
        """Per producer, the group of each of its present output channels."""
        return {name: ids[self.cuts.present(name, "outputs")] for name, ids in self.graph.outputs.items()}

    def _dead_outputs(self) -> dict[str, Tensor | None]:
        """Per producer, per original output channel: are its weights exact zeros (bits <= 0)? None for a producer
        that is not quantized or not picked by include/exclude. One transfer from the device for all layers."""
        g = self.graph
        bits = self.producer_bits()
        quantized = {name: b for name, b in bits.items() if b is not None}
        dead: dict[str, Tensor | None] = dict.fromkeys(bits)
        if not quantized:
            return dead
        flat = torch.cat([b.detach().reshape(-1) for b in quantized.values()]).cpu() <= 0
        for (name, b), part in zip(quantized.items(), flat.split([b.numel() for b in quantized.values()])):
            dead[name] = torch.ones(len(g.outputs[name]), dtype=torch.bool)
            dead[name][self.cuts.present(name, "outputs")] = part
        return dead

    def dead_groups(self, dead: dict[str, Tensor | None] | None = None) -> Tensor:
        """Groups not yet removed whose every producer channel is at 0 bits (the L1 pull acts on these)."""
        g = self.graph
        dead = self._dead_outputs() if dead is None else dead
        alive = self.cuts.removed.clone()
        has_producer = torch.zeros(g.num_groups, dtype=torch.bool)
        for name, groups in g.outputs.items():
            has_producer[groups] = True
            alive[groups[~dead[name]] if dead[name] is not None else groups] = True
        return has_producer & ~alive & ~self.cuts.removed & ~g.pinned_mask

    def _dead_channels(self, outputs: dict[str, Tensor | None], groups: Tensor) -> dict[str, Tensor]:
        """Per producer and per-channel module, over its current positions: the channels that are dead, in a dead
        group or on a branch whose producer's channel is at 0 bits. Modules without one are left out."""
        g = self.graph
        dead = {}
        for role in ("outputs", "members"):
            for name, table in getattr(g, role).items():
                mask = groups[table]
                branch = g.branch_of(name, role)
                if branch is not None and outputs[branch] is not None:
                    mask = mask | outputs[branch]
                mask = mask[self.cuts.present(name, role)]
                if mask.any():
                    dead[name] = mask
        return dead

    @torch.no_grad()
    def pull_constants(self, amount: float) -> int:
        """The paper's L1 pull on what a dead channel still emits, as a proximal step: shrink the biases and norm
        shifts of dead channels by `amount` towards zero, stopping at zero. Returns how many groups are dead."""
        g = self.graph
        outputs = self._dead_outputs()
        groups = self.dead_groups(outputs)
        for name, where in self._dead_channels(outputs, groups).items():
            bias = getattr(g.model.get_submodule(name), "bias", None)
            if isinstance(bias, Tensor) and bias.dim() == 1 and len(bias) == len(where):
                where = where.to(bias.device)
                chosen = bias.data[where]
                bias.data[where] = chosen.sign() * (chosen.abs() - amount).clamp_min(0)
        return int(groups.sum())

    @torch.no_grad()
    def settle_statistics(self) -> int:
        """Set the running statistics of dead channels to the limits their running averages approach: the
        channel's constant as the mean, zero variance. In eval mode such a channel then emits the norm's shift, as
        in train mode, so the two modes agree and the constant can be removed or folded exactly. This changes the
        eval-mode output slightly (as the running averages would have, given time); run it before a surgery, not
        inside one. Returns the number of channels settled."""
        g = self.graph
        outputs = self._dead_outputs()
        dead = self._dead_channels(outputs, self.dead_groups(outputs))
        if not dead:
            return 0
        train = g.constants(True, outputs.get, self.cuts)
        settled = 0
        for step in g.steps:
            if step.kind != "norm" or step.payload not in dead:
                continue
            module = g.model.get_submodule(step.payload)
            if getattr(module, "running_mean", None) is None:
                continue
            present = self.cuts.present(step.payload, "members")
            value = train[step.sources[0]][present]
            where = dead[step.payload] & value.isfinite()
            if where.any():
                device = module.running_mean.device
                module.running_mean[where.to(device)] = value[where].to(device, module.running_mean.dtype)
                module.running_var[where.to(device)] = 0.0
                settled += int(where.sum())
        return settled

    @torch.no_grad()
    def find(self) -> Removal:
        """The dead groups whose removal provably leaves the network's function unchanged, in both modes."""
        g = self.graph
        self.cuts.check_unchanged()
        outputs = self._dead_outputs()
        candidates = self.dead_groups(outputs)
        present = {p: self.cuts.present(p, "outputs") for p in g.branches}
        dead_in_branches = any(outputs[p] is not None and outputs[p][present[p]].any() for p in g.branches)
        if not candidates.any() and not dead_in_branches:
            return Removal(candidates)
        train = g.constants(True, outputs.get, self.cuts)
        evaluation = g.constants(False, outputs.get, self.cuts)
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
        return Removal(removable, corrections, self._branch_cuts(outputs, removable, train, evaluation))

    def _branch_cuts(self, outputs, removable: Tensor, train: dict, evaluation: dict) -> dict[str, Tensor]:
        """Per branch producer, the dead channels (not going with their group) for which the branch adds exactly
        zero in both modes: they leave this branch alone."""
        g = self.graph
        cuts = {}
        for producer, branch in g.branches.items():
            dead = outputs[producer]
            if dead is None:
                continue
            t, e = train[branch.tail_node], evaluation[branch.tail_node]
            present = self.cuts.present(producer, "outputs")
            staying = present & ~removable[g.outputs[producer]]
            cut = staying & dead & (t.abs() <= self.atol) & (e.abs() <= self.atol)
            going = cut.nonzero().flatten().tolist()
            width = int(staying.sum())
            while going and not self._width_ok(producer, width - len(going), int(present.sum())):
                cut[going.pop()] = False
            if going:
                cuts[producer] = cut
        return cuts

    def _fit_widths(self, removable: Tensor) -> Tensor:
        """Give groups back until every layer keeps at least one position (PyTorch has no zero-width layers) and
        every producer's width is one it may have (`_width_ok`): the smallest allowed width that holds its live
        channels, which on a latency staircase is the fastest."""
        g = self.graph
        changed = True
        while changed:
            changed = False
            for role in ("outputs", "inputs", "members"):
                for name, groups in getattr(g, role).items():
                    present = groups[self.cuts.present(name, role)]
                    going = present[removable[present]].tolist()
                    while going and not (
                        self._width_ok(name, int((~removable[present]).sum()), len(present))
                        if role == "outputs"
                        else int((~removable[present]).sum()) > 0
                    ):
                        removable[going.pop()] = False
                        changed = True
        return removable

    def _bias_correction(self, name: str, fold: Tensor, value: Tensor) -> Tensor:
        g = self.graph
        module = g.model.get_submodule(name)
        present = self.cuts.present(name, "inputs")
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
        self.cuts.check_unchanged()
        for optimizer in optimizers:
            check_optimizer(optimizer)
        remove = removal.groups
        bad = remove & (self.cuts.removed | g.pinned_mask)
        if bad.any():
            group = int(bad.nonzero()[0])
            why = "was removed before" if self.cuts.removed[group] else f"is pinned: {g.pinned.get(group)}"
            raise GraphError(f"Cannot remove the group of {g.key(group)} (module, output channel): it {why}.")
        cuts = removal.cuts
        for producer, cut in cuts.items():
            if producer not in g.branches or len(cut) != len(g.outputs[producer]):
                raise GraphError(f"'{producer}' is not the producer of a residual branch with {len(cut)} channels.")
            if (cut & ~self.cuts.present(producer, "outputs")).any():
                channel = int((cut & ~self.cuts.present(producer, "outputs")).nonzero()[0])
                raise GraphError(f"Cannot cut channel {channel} from the branch of '{producer}': it is gone already.")
        plan = _Plan()
        weights_before = sum(m.weight.numel() for m in _layers(g))
        channels = {}
        for name in g.modules():
            module = g.model.get_submodule(name)
            keep = {role: self.cuts.kept(name, role, remove, cuts) for role in g.tables(name)}
            if all(k is None for k in keep.values()):
                continue
            if "outputs" in keep and keep["outputs"] is not None:
                channels[name] = self.cuts.width(name, "outputs") - len(keep["outputs"])
            plan.module(name, module, keep, removal.folds.get(name))
        plan.optimizer_state(optimizers)
        plan.apply()
        self.cuts.removed |= remove
        for producer, cut in cuts.items():
            self.cuts.cut[producer] |= cut
        self._reembed()
        record = SurgeryRecord(
            step=step,
            groups=[g.key(i) for i in remove.nonzero().flatten().tolist()],
            channels={k: v for k, v in channels.items() if v},
            weights_removed=weights_before - sum(m.weight.numel() for m in _layers(g)),
            seconds=seconds,
            branches={p: c.nonzero().flatten().tolist() for p, c in cuts.items() if c.any()},
        )
        self.history.append(record)
        return record

    def _reembed(self) -> None:
        """Every branch with channels cut from it alone re-embeds its output at the stream's current width."""
        g = self.graph
        for producer, branch in g.branches.items():
            stream = ~self.cuts.removed[g.outputs[producer]]
            device = g.model.get_submodule(producer).weight.device
            kept = self.cuts.present(producer, "outputs")[stream]
            set_reembedding(g.model.get_submodule(branch.tail), kept, device, branch.dim)

    def state_dict(self) -> dict[str, Any]:
        """The history and the traced input's shape: what `load_compressed` needs to rebuild the cut model."""
        return {
            "history": [record.to_dict() for record in self.history],
            "input_shape": list(self.graph.input_shape),
            "input_dtype": str(self.graph.input_dtype).removeprefix("torch."),
        }

    def replay(self, history: Iterable[SurgeryRecord | dict]) -> None:
        """Re-apply recorded removals to a freshly built model (values come from its checkpoint afterwards)."""
        for entry in history:
            record = entry if isinstance(entry, SurgeryRecord) else SurgeryRecord.from_dict(entry)
            mask = torch.zeros(self.graph.num_groups, dtype=torch.bool)
            cuts = {}
            try:
                for module, channel in record.groups:
                    mask[self.graph.group_of(module, channel)] = True
                for producer, channels in record.branches.items():
                    if producer not in self.graph.branches:
                        raise GraphError(f"'{producer}' is not the producer of a residual branch")
                    cuts[producer] = torch.zeros(len(self.graph.outputs[producer]), dtype=torch.bool)
                    cuts[producer][channels] = True
            except (GraphError, IndexError) as error:
                raise GraphError(f"The surgery history does not fit this model: {error}") from error
            try:
                self.remove(Removal(mask, cuts=cuts), step=record.step, seconds=record.seconds)
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
                if t.dim() == len(weight_shape) and all(n in (w, 1) for n, w in zip(t.shape, weight_shape)):
                    if out_keep is not None and t.shape[0] == out_count:  # the weight, or state factored over
                        t = t.index_select(0, out_keep.to(t.device))  # other dimensions (size 1 there)
                    if in_keep is not None and not grouped and t.shape[1] == weight_shape[1]:
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
            if one_channel_per_group(module):
                self.attributes.append((module, "num_groups", len(member_keep)))
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
                if b is None or b.dim() == 0 or bname == GATHER:  # the re-embedding is derived after the surgery
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
                    if not isinstance(value, Tensor) or value.dim() == 0:
                        continue
                    new = slicer(value)
                    if new is None:
                        raise ValueError(
                            f"{type(optimizer).__name__} keeps state '{key}' of shape {tuple(value.shape)} for a "
                            f"parameter of shape {tuple(p.shape)}: the surgeon cannot tell how to slice it. Use an "
                            "optimizer whose state is per parameter, or no ChannelSurgeon."
                        )
                    self.state.append((state, key, new))

    def apply(self) -> None:
        for state, key, value in self.state:
            state[key] = _laid_out_like(value, state[key])
        for p, new, _ in self.params:
            p.data = _laid_out_like(new, p.data)
        for p, grad in self.grads:
            p.grad = _laid_out_like(grad, p.grad)
        for module, name, value in self.buffers:
            module._buffers[name] = _laid_out_like(value, module._buffers[name])
        for module, name, value in self.attributes:
            setattr(module, name, value)


def _laid_out_like(new: Tensor, old: Tensor) -> Tensor:
    """Contiguous in the old tensor's memory format: a channels_last model stays channels_last (on CPU, oneDNN's
    convolutions then scale with the width much better than in the default layout)."""
    for memory_format, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if old.dim() == dim and not old.is_contiguous() and old.is_contiguous(memory_format=memory_format):
            return new.contiguous(memory_format=memory_format)
    return new.contiguous()


def traced_input(state: Mapping[str, Any]) -> Tensor:
    """Zeros of the shape and dtype the surgeon traced on, from its `state_dict()`: enough to trace the model again."""
    return torch.zeros(state["input_shape"], dtype=getattr(torch, state["input_dtype"]))


def save_compressed(model: nn.Module, surgeon: Surgeon | None, path: str | os.PathLike) -> Path:
    """Write `model`'s weights and the surgeon's history to `path` (atomically), for `load_compressed`: the plain
    PyTorch counterpart of a Lightning checkpoint of the callbacks."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), SURGERY_KEY: surgeon.state_dict() if surgeon else None}, tmp)
    return path


def load_compressed(model: nn.Module, checkpoint: str | Path | Mapping[str, Any], strict: bool = True) -> nn.Module:
    """Rebuild a compressed model for inference from a freshly built `model` (the module that was trained, e.g. the
    LightningModule) and a checkpoint written during or after compression: replay the surgery history, attach
    quantizers and 2:4 masks where the checkpoint has them, then load the weights. Returns `model`, in eval mode.

    `checkpoint`: a file or mapping with {"state_dict", "surgery": `Surgeon.state_dict()`}, as `save_compressed` and
    the Lightning checkpoints of a run with `ChannelSurgeon` write it, or a plain state_dict of a model that was
    never cut.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint)
    state_dict = checkpoint.get("state_dict", checkpoint)
    surgeon_state = checkpoint.get(SURGERY_KEY) or {}
    if surgeon_state.get("history"):
        Surgeon(ChannelGraph(model, traced_input(surgeon_state))).replay(surgeon_state["history"])
    quantized = sorted(k.removesuffix(".weight_quantizer.bits") for k in state_dict if k.endswith(".weight_quantizer.bits"))
    if quantized:
        config = QuantizationConfig(include=tuple(quantized))
        layers = attach_quantizers(model, config)
        key = ".input_quantizer.log2_scale"  # layers trained with int8 inputs
        int8_inputs = {k.removesuffix(key) for k in state_dict if k.endswith(key)}
        if int8_inputs:  # the trace is for their steps alone
            attach_activation_quantizers({name: m for name, m in layers.items() if name in int8_inputs})
            graph = leaf_trace(model)
            share_input_steps(model, graph, state=state_dict)  # where the checkpoint holds one step for its readers
            if any(k.endswith(".output_quantizer.log2_scale") for k in state_dict):  # residual Adds trained with steps
                attach_residual_steps(model, graph=graph)
            attach_folded_steps(model, graph)  # where the state says shifted, loaded below
    for key, buffer in ((k, b) for k in state_dict for b in (MASK, DROPPED) if k.endswith(f".{b}")):
        owner = model.get_submodule(key.removesuffix(f".{buffer}"))  # 2:4 buffers the fresh model lacks
        if not isinstance(getattr(owner, buffer, None), torch.Tensor):
            owner.register_buffer(buffer, torch.zeros(state_dict[key].shape, dtype=state_dict[key].dtype))
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as error:
        raise RuntimeError(
            f"The checkpoint does not fit {type(model).__name__} after replaying its surgery history "
            f"({len(surgeon_state.get('history', []))} surgeries). Build the model with the same class and arguments "
            f"as the one that was trained. {error}"
        ) from error
    return model.eval()
