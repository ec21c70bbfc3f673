"""Channel permutations for 2:4 sparsity (Pool & Yu 2021, "Channel Permutations for N:M Sparsity"): reorder channels
so that magnitude 2:4 pruning keeps more weight mass, while the network computes exactly the same function.

Which input channels share a group of 4 decides what magnitude pruning must drop. A channel's position can change
only together everywhere it lives: every producer's output, every per-channel module (BatchNorm, PReLU) and every
consumer's input. The channel graph (groups.py) tells, per module and role, which channel group sits at each position.
Two groups may trade places when they live in exactly the same modules in the same roles with equally many positions
each (one *channel space*) and neither is pinned. So a residual stream is one space across all its blocks (one
permutation serves every producer and consumer: its gain is summed over all of them), a channel flattened into H*W
features of a Linear moves as a block, and a grouped convolution, whose convolution groups the graph ties into single
channel groups, trades whole convolution groups, never splitting one. Positions of a group are mapped in order.

The search is a deterministic greedy: the best swap of two channels in different groups of 4, summed over every 2:4
consumer of the space, while it gains, within windows of bounded size. Applying it reuses the surgeon's in-place
plan, so parameters keep their identity and gradients, masks, quantizer b and e and optimizer state move too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .groups import ChannelGraph, Cuts
from .sparsity import CALCULATORS, as_rows, eligible_layers, kept_magnitude
from .surgery import _Plan

__all__ = ["ChannelSpace", "PermutationReport", "apply_permutations", "channel_spaces", "permute_for_24", "search"]


@dataclass
class ChannelSpace:
    """Channel groups that may trade places; `positions[(role, module)]` is [groups, k]: each group's k current
    positions there, ascending. Place i is where group `groups[i]` sits now."""

    groups: Tensor
    positions: dict[tuple[str, str], Tensor]


@dataclass
class PermutationReport:
    """Per 2:4 layer, the fraction of weight magnitude the calculator's mask keeps, before and after permuting."""

    before: dict[str, float]
    after: dict[str, float]
    spaces: int = 0  # channel spaces reordered
    swaps: int = 0
    seconds: float = 0.0
    unsearched: dict[str, str] = field(default_factory=dict)  # a space (by its first group's producer): why not

    def gain(self) -> dict[str, float]:
        """Per layer, the weight magnitude its 2:4 mask keeps after the permutation less before it."""
        return {name: self.after[name] - self.before[name] for name in self.before}

    def to_dict(self) -> dict:
        """As JSON-ready data, for the run's report."""
        return {"before": dict(self.before), "after": dict(self.after), "spaces": self.spaces, "swaps": self.swaps,
                "seconds": self.seconds, "unsearched": dict(self.unsearched)}  # fmt: skip


def _current(graph: ChannelGraph) -> dict[tuple[str, str], Tensor]:
    """Per (role, module): the group at each position of the model as traced (a permutation comes before any cut)."""
    return {(role, name): groups
            for role in ("outputs", "inputs", "members") for name, groups in getattr(graph, role).items()}  # fmt: skip


def channel_spaces(graph: ChannelGraph) -> list[ChannelSpace]:
    """The graph's channel spaces of two or more groups: groups with the same positions count in every (role,
    module), not pinned."""
    tables = _current(graph)
    keys = list(tables)
    counts = torch.stack([torch.bincount(tables[k], minlength=graph.num_groups) for k in keys])  # [tables, groups]
    free = ~graph.pinned_mask & (counts.sum(0) > 0)
    candidates = free.nonzero().flatten()
    signatures, space_of = torch.unique(counts[:, candidates], dim=1, return_inverse=True)
    spaces = []
    orders = {k: torch.sort(t, stable=True) for k, t in tables.items()}
    for s in range(signatures.shape[1]):
        groups = candidates[space_of == s]
        if len(groups) < 2:
            continue
        positions = {}
        for t in signatures[:, s].nonzero().flatten().tolist():
            key, k = keys[t], int(signatures[t, s])
            sorted_groups, order = orders[key]
            start = torch.searchsorted(sorted_groups, groups)
            positions[key] = order[start[:, None] + torch.arange(k)]
        spaces.append(ChannelSpace(groups, positions))
    return spaces


def _indices(graph: ChannelGraph, spaces: Sequence[ChannelSpace], perms: Sequence[Tensor]) -> dict[str, dict[str, Tensor]]:
    """Per module and role, the index that reorders its current positions (new[i] = old[index[i]])."""
    tables = _current(graph)
    index: dict[tuple[str, str], Tensor] = {}
    for space, perm in zip(spaces, perms):
        if torch.equal(perm, torch.arange(len(perm))):
            continue
        for key, positions in space.positions.items():
            ix = index.setdefault(key, torch.arange(len(tables[key])))
            ix[positions.flatten()] = positions[perm].flatten()
    per_module: dict[str, dict[str, Tensor]] = {}
    for (role, name), ix in index.items():
        per_module.setdefault(name, {})[role] = ix
    return per_module


@torch.no_grad()
def apply_permutations(
    graph: ChannelGraph,
    spaces: Sequence[ChannelSpace],
    perms: Sequence[Tensor],
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> None:
    """Reorder each space in place: place i receives what was at place `perm[i]`, in every module of the space, with
    parameters (identity kept), buffers (running statistics, 2:4 masks), gradients and optimizer state tensors of a
    parameter's shape. The graph keeps describing the model as traced: trace a new one for a surgery afterwards."""
    Cuts(graph).check_unchanged()
    plan = _Plan()
    for name, keep in _indices(graph, spaces, perms).items():
        plan.module(name, graph.model.get_submodule(name), keep, None)
    plan.optimizer_state(optimizers)
    plan.apply()


# ---- search ----------------------------------------------------------------------------------------------------


class _Consumer:
    """One 2:4 layer's view of a window of places: |weight| as input columns x rows (transposed, so that a column is
    contiguous; the current arrangement, shared by every space this layer reads and updated as channels move), each
    place's column and group of 4, and gain[p, h]: what the layer's kept magnitude gains if the window's group h
    took place p."""

    def __init__(self, magnitude: Tensor, columns: Tensor) -> None:
        self.m, self.columns, self.quads = magnitude, columns, columns // 4
        self.same_quad = self.quads[:, None] == self.quads[None, :]
        self.vectors = magnitude[columns].clone()  # group h's column, whichever place it moves to
        self.gain = torch.empty(len(columns), len(columns), dtype=magnitude.dtype)
        self.refresh(torch.arange(len(columns)))

    def refresh(self, places: Tensor, chunk_elements: int = 1 << 22) -> None:
        """Recompute the gains at `places` from their quads as they are now: top-2 of {o1 >= o2 >= o3, v} is
        o1 + max(o2, v), so a place's kept magnitude with any candidate column is one maximum and one sum."""
        quad_columns = self.quads[places, None] * 4 + torch.arange(4)
        others = quad_columns[quad_columns != self.columns[places, None]].view(len(places), 3)
        second = self.m[others].topk(2, dim=1).values[:, 1]  # o2 per place and row; o1 cancels in the gain
        base = torch.maximum(second, self.m[self.columns[places]]).sum(1)
        step = max(1, chunk_elements // self.vectors.numel())
        for start in range(0, len(places), step):
            part = slice(start, start + step)
            kept = torch.maximum(second[part, None, :], self.vectors[None]).sum(2)
            self.gain[places[part]] = kept - base[part, None]

    def swap(self, p1: int, p2: int) -> None:
        c1, c2 = int(self.columns[p1]), int(self.columns[p2])
        self.m[[c1, c2]] = self.m[[c2, c1]]
        self.refresh(((self.quads == self.quads[p1]) | (self.quads == self.quads[p2])).nonzero().flatten())


def _greedy(consumers: list[_Consumer], max_swaps: int, tolerance: float) -> tuple[Tensor, int]:
    """Swap the two places (in different groups of 4) whose exchange gains most over all consumers, while it gains.
    Returns (content, swaps): content[p] is the window's group now at place p."""
    n = len(consumers[0].columns)
    content = torch.arange(n)
    swaps = 0
    while swaps < max_swaps:
        total = torch.zeros(n, n, dtype=consumers[0].m.dtype)
        for c in consumers:
            g = c.gain[:, content]  # g[p1, p2]: gain at p1 from the group now at p2
            total += (g + g.T).masked_fill_(c.same_quad, 0.0)
        p1, p2 = divmod(int(total.argmax()), n)
        if total[p1, p2] <= tolerance:
            break
        content[[p1, p2]] = content[[p2, p1]]
        for c in consumers:
            c.swap(p1, p2)
        swaps += 1
    return content, swaps


def _columns_of(space: ChannelSpace, name: str) -> tuple[Tensor | None, str | None]:
    """The space's columns in a 2:4 layer's inputs (one per place); None if reordering the space cannot change that
    layer's kept magnitude, or with a reason if it would and the search cannot follow it."""
    positions = space.positions.get(("inputs", name))
    if positions is None:
        return None, None
    k = positions.shape[1]
    if k == 1:
        return positions[:, 0], None
    contiguous = bool((positions == positions[:, :1] + torch.arange(k)).all())
    if contiguous and k % 4 == 0 and bool((positions[:, 0] % 4 == 0).all()):
        return None, None  # blocks of whole groups of 4 move together: the layer keeps the same magnitude
    return None, f"its channels reach '{name}' as blocks of {k} inputs that straddle groups of 4"


def search(
    graph: ChannelGraph,
    spaces: Sequence[ChannelSpace],
    layers: Iterable[str],
    window: int = 256,
    max_swaps: int = 100_000,
) -> tuple[list[Tensor], dict[str, str], int]:
    """Per space, a permutation (place i receives place perm[i]) that raises the total magnitude 1-D 2:4 pruning
    keeps in `layers`, never lowering it. A space larger than `window` places is searched in windows of that size,
    twice, the second pass offset by half a window; at most `max_swaps` swaps per window.
    Returns (perms, {space not searched: why}, swaps made)."""
    if window < 2:
        raise ValueError(f"window={window} must be at least 2 places.")
    layers = [n for n in layers if n in graph.inputs]
    magnitudes = {n: as_rows(graph.model.get_submodule(n).weight.detach()).abs().double().cpu().T.contiguous()
                  for n in layers}  # [inputs, rows]
    perms, unsearched, swaps = [], {}, 0
    for space in spaces:
        n = len(space.groups)
        perm = torch.arange(n)
        perms.append(perm)
        columns, why = {}, None
        for name in layers:
            found, reason = _columns_of(space, name)
            why = why or reason
            if found is not None:
                columns[name] = found
        if why:
            module, channel = graph.key(int(space.groups[0]))
            unsearched[f"{module}[{channel}] and {n - 1} more"] = why
        if why or not columns:
            continue
        scale = sum(float(magnitudes[name][cols].sum()) for name, cols in columns.items())
        starts = [*range(0, n, window), *(range(window // 2, n - window // 2, window) if n > window else ())]
        for start in starts:
            places = torch.arange(start, min(start + window, n))
            consumers = [_Consumer(magnitudes[name], cols[places]) for name, cols in columns.items()]
            content, made = _greedy(consumers, max_swaps, 1e-12 * scale)
            perm[places] = perm[places][content]
            swaps += made
    return perms, unsearched, swaps


def _kept(model: nn.Module, layers: Iterable[str], calculator: str) -> dict[str, float]:
    kept = {}
    for name in layers:
        weight = model.get_submodule(name).weight
        kept[name] = kept_magnitude(weight, CALCULATORS[calculator](weight))
    return kept


def permute_for_24(
    model: nn.Module,
    example_input: Tensor,
    layers: Iterable[str] | None = None,
    optimizers: Sequence[torch.optim.Optimizer] = (),
    calculator: str = "1d",
    window: int = 256,
    max_swaps: int = 100_000,
) -> PermutationReport:
    """Reorder the channels of `model` in place so that 2:4 magnitude pruning of `layers` (default: every eligible
    layer) keeps more weight magnitude; the function stays the same. `optimizers` have their state reordered too.
    The search optimises the 1-D calculator's kept magnitude; the report measures `calculator`'s."""
    started = time.perf_counter()
    layers = list(eligible_layers(model, calculator)[0] if layers is None else layers)
    graph = ChannelGraph(model, example_input)
    before = _kept(model, layers, calculator)
    spaces = channel_spaces(graph)
    perms, unsearched, swaps = search(graph, spaces, layers, window, max_swaps)
    apply_permutations(graph, spaces, perms, optimizers)
    moved = sum(not torch.equal(p, torch.arange(len(p))) for p in perms)
    return PermutationReport(before, _kept(model, layers, calculator), moved, swaps,
                             time.perf_counter() - started, unsearched)  # fmt: skip
