"""Bits of the quantized network, as a differentiable function of the bit depths, and the size loss.

bits(layer) = sum over output channels i of max(b_i, 0) * (live inputs of i's group) * kernel size.

A 2:4-sparse layer (one with a `weight_mask` that drops weights) stores only the kept weights, each with a 2-bit
index of its position in its group of 4 (TensorRT's compressed format: 2 values and 2 indices per group):
bits(layer) = sum over alive output channels i of (max(b_i, 0) + 2) * (kept weights of i on live inputs).

An input channel is live while some producer of it still has b > 0 (or it comes from something that is not
quantized). A dead producer emits a constant, which the next layer can fold into its bias, so that slice of the
next layer's weights costs nothing: the paper's refinement, followed through the channel graph.

The loss is gamma * bits / (weights of the original float network): gamma times the average bits per weight.

The real-valued bits are the training signal; the size that counts is `deployable_bits`: per channel, the whole
bits its stored integers need (`quant.integer_bits`), times the same weight counts. That is what a file packed at
whole bits per channel holds, and what fixed-bit baselines are compared at.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .groups import ChannelGraph, GraphError
from .ops import PRODUCERS, weights_read_directly
from .quant import integer_bits, integer_weights, quantized_layers

__all__ = [
    "GammaSchedule", "LayerShape", "LayerSize", "SizeModel", "SizeReport", "float_size_report", "input_sources",
    "weighted_sum",
]


@dataclass(frozen=True)
class LayerShape:
    """One layer's output channels and weights: as first traced (before any cut), and alive or kept now. The one
    per-layer row of every table (size, surgery, export), so that rows and totals share one denominator:
    'alive/channels' and 'kept/weights' of the original network."""

    name: str
    channels: int
    channels_alive: int
    weights: int
    weights_kept: int

    @staticmethod
    def total(rows: Sequence[LayerShape]) -> LayerShape:
        """The rows' counts summed, as one row named 'total'."""
        counts = ("channels", "channels_alive", "weights", "weights_kept")
        return LayerShape("total", *(sum(getattr(row, count) for row in rows) for count in counts))


@dataclass(frozen=True)
class LayerSize(LayerShape):
    """One layer's size: its shape, and the bits of its weights (real-valued and deployable)."""

    bits: float
    deployable_bits: int  # whole bits per channel, as many as its stored integers need (`integer_bits`)

    @property
    def deployable_bits_per_weight(self) -> float:
        return self.deployable_bits / self.weights if self.weights else 0.0

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights if self.weights else 0.0


@dataclass(frozen=True)
class SizeReport:
    layers: list[LayerSize]
    float_weights: int
    bits: float = field(init=False)
    deployable_bits: int = field(init=False)
    weights_kept: int = field(init=False)
    channels: int = field(init=False)
    channels_alive: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("bits", "deployable_bits", "weights_kept", "channels", "channels_alive"):
            object.__setattr__(self, name, sum(getattr(layer, name) for layer in self.layers))

    @property
    def bits_per_weight(self) -> float:
        """Real-valued bits over the float network's weights: the training signal."""
        return self.bits / self.float_weights

    @property
    def size_bytes(self) -> int:
        """The real-valued bits in bytes, rounded up."""
        return math.ceil(self.bits / 8)

    @property
    def deployable_bits_per_weight(self) -> float:
        """The size that counts: whole bits per channel, per weight of the float network."""
        return self.deployable_bits / self.float_weights

    @property
    def deployable_bytes(self) -> int:
        """The deployable bits in bytes, rounded up: what a file packed at whole bits per channel holds."""
        return math.ceil(self.deployable_bits / 8)

    @property
    def float32_bytes(self) -> int:
        """The float network's weights at 32 bits."""
        return 4 * self.float_weights

    @property
    def percent_of_float32(self) -> float:
        """The real-valued bits as a percentage of the float network's float32 bits."""
        return 100.0 * self.bits / (32 * self.float_weights)

    def to_dict(self) -> dict:
        """As JSON-ready data: the totals and one row per layer."""
        summary = {
            name: getattr(self, name)
            for name in (
                "bits", "bits_per_weight", "size_bytes", "deployable_bits", "deployable_bits_per_weight",
                "deployable_bytes", "float32_bytes",
                "percent_of_float32", "float_weights", "weights_kept", "channels", "channels_alive",
            )
        }
        summary["layers"] = [
            asdict(layer)
            | {"bits_per_weight": layer.bits_per_weight, "deployable_bits_per_weight": layer.deployable_bits_per_weight}
            for layer in self.layers
        ]
        return summary


def _geometry(module: nn.Module) -> tuple[int, int, int]:
    """(input features, groups, kernel size) of a Conv or Linear layer."""
    if isinstance(module, _ConvNd):
        return module.in_channels, module.groups, math.prod(module.kernel_size)
    return module.in_features, 1, 1


def float_size_report(model: nn.Module) -> SizeReport:
    """The same report for a float32 network: every Conv/Linear weight at 32 bits."""
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, (_ConvNd, nn.Linear)):
            n, channels = m.weight.numel(), m.weight.shape[0]
            layers.append(LayerSize(name, channels, channels, n, n, 32.0 * n, 32 * n))
    return SizeReport(layers, sum(layer.weights for layer in layers))


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Per quantized layer, its (output channels, weights) now."""
    return {name: (m.weight.shape[0], m.weight.numel()) for name, m in quantized_layers(model).items()}


Producers = frozenset[tuple[str, int]]  # the (layer, output channel) pairs whose values reach one input position


def input_sources(model: nn.Module, example_input: Tensor | None) -> dict[str, list[Producers | None] | None]:
    """Per Conv/Linear layer, per input position, its producers: the channel walker (core/groups.py) in its lenient
    mode. None where it cannot tell (the model's input, an op it does not know, a model it cannot trace or run):
    those inputs count as live, so the size is overestimated, never underestimated."""
    return _sources(model, _lenient_graph(model, example_input))


def _lenient_graph(model: nn.Module, example_input: Tensor | None) -> ChannelGraph | None:
    """The channel graph for size accounting; None, with a warning, where it cannot be traced."""
    if example_input is None:
        why = "no example input was given (SizeModel(model, example_input), SelfCompressor.attach(model, example))"
    else:
        try:
            graph = ChannelGraph(model, example_input.detach()[:2], strict=False)
            _check_weights_go_through_forward(model, graph.fx_graph)
            return graph
        except GraphError as error:
            why = str(error)
    warnings.warn(
        f"Size accounting cannot follow the channels of {type(model).__name__}: {why.rstrip('.')}. It counts every "
        "input channel as live, so the reported size is an upper bound.",
        stacklevel=3,
    )
    return None


def _sources(model: nn.Module, graph: ChannelGraph | None) -> dict[str, list[Producers | None] | None]:
    layers = [name for name, m in model.named_modules() if isinstance(m, PRODUCERS)]
    producers = graph.input_producers() if graph is not None else {}
    return {name: producers.get(name) for name in layers}


def _check_weights_go_through_forward(model: nn.Module, graph: torch.fx.Graph) -> None:
    """A quantized layer whose weight the model reads itself would train and be counted as quantized while its float
    weight is what runs: refuse, naming it."""
    bypassed = [name for name in weights_read_directly(graph) if hasattr(model.get_submodule(name), "weight_quantizer")]
    if bypassed:
        raise ValueError(
            f"The model reads the weight of the quantized layers {bypassed} itself, not through their forward, so "
            f"their quantizers would not act. Leave them out: exclude={bypassed} (SelfCompression, QuantizationConfig, "
            "or compression.exclude in lsc-train)."
        )


class SizeModel:
    """Size accounting for the quantized layers of one model. The channel graph is traced once, here, on
    `example_input` (a sample or two of what forward takes; without it every input channel counts as live).

    `original` is each layer's (channels, weights) in the float network the size is measured against (`layer_shapes`
    before any cut; default: the model's now), and `float_weights` their total. After a cut, `rebuilt` carries it over.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Tensor | None = None,
        *,
        original: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        self.layers = quantized_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no quantized layer; attach quantizers first.")
        self.example_input = None if example_input is None else example_input.detach()[:2]
        self.original = {**layer_shapes(model), **(original or {})}
        self.float_weights = sum(weights for _, weights in self.original.values())
        self._shapes = [m.weight.shape for m in self.layers.values()]
        index = {name: i for i, name in enumerate(self.layers)}
        graph = _lenient_graph(model, self.example_input)
        sources = _sources(model, graph)
        # a 0-bit logit is a class the network can no longer tell apart: these keep a bit (`SelfCompressor.end_step`)
        self.output_layers = [name for name in graph.output_producers() if name in self.layers] if graph else []
        self._plans = []
        for name, module in self.layers.items():
            in_features, groups, kernel = _geometry(module)
            channel_map = sources.get(name)
            always_live = torch.ones(in_features, dtype=torch.bool)
            edges: dict[int, tuple[list[int], list[int]]] = {}  # producer index -> (input indices, producer channels)
            if channel_map is not None:
                for i, producers in enumerate(channel_map):
                    quantized = [(index[p], ch) for p, ch in producers or () if p in index]
                    if producers and len(quantized) == len(producers):
                        always_live[i] = False
                        for p, ch in quantized:
                            edges.setdefault(p, ([], []))[0].append(i)
                            edges[p][1].append(ch)
            edge_tensors = [(p, torch.tensor(ins), torch.tensor(chs)) for p, (ins, chs) in edges.items()]
            self._plans.append((always_live, edge_tensors, groups, kernel))

    def rebuilt(self, model: nn.Module) -> SizeModel:
        """The same accounting for `model` after a cut: sizes still per weight and channel of the original network."""
        return SizeModel(model, self.example_input, original=self.original)

    def stale(self) -> bool:
        """Whether a layer changed shape since this was built (channels were removed): then build it anew."""
        return any(m.weight.shape != shape for m, shape in zip(self.layers.values(), self._shapes))

    def _live_inputs(self, alive: list[Tensor]) -> tuple[list[Tensor], list[bool]]:
        """Per layer, the number of weights kept behind each output channel on live inputs (live inputs x kernel,
        or the mask's count for a 2:4-sparse layer), and whether the layer is 2:4-sparse."""
        counts, sparse = [], []
        for (always_live, edges, groups, kernel), b, module in zip(self._plans, alive, self.layers.values()):
            live = always_live.to(b.device, torch.float32)
            for producer, inputs, channels in edges:
                live = live.index_add(0, inputs.to(b.device), alive[producer][channels.to(b.device)].float())
            mask = getattr(module, "weight_mask", None)
            if isinstance(mask, Tensor) and not bool(mask.all()):
                counts.append(mask.flatten(1).view(mask.shape[0], mask.shape[1], -1).sum(2).float() @ (live > 0).float())
                sparse.append(True)
                continue
            per_group = (live > 0).float().view(groups, -1).sum(1) * kernel
            counts.append(per_group.repeat_interleave(b.numel() // groups))
            sparse.append(False)
        return counts, sparse

    def _bits(self) -> list[Tensor]:
        return [m.weight_quantizer.bits for m in self.layers.values()]

    def layer_bits(self) -> dict[str, Tensor]:
        """Each quantized layer's bits; differentiable in its b."""
        bits = self._bits()
        counts, sparse = self._live_inputs([b.detach() > 0 for b in bits])
        terms = ((b.float().relu() * c).sum() + _index_bits(b, c, s) for b, c, s in zip(bits, counts, sparse))
        return dict(zip(self.layers, terms))

    def bits(self, layer_weights: Mapping[str, float] | None = None) -> Tensor:
        """Total bits of the quantized weights; differentiable in every b. `layer_weights`: see `weighted_sum`."""
        return weighted_sum(self.layer_bits(), layer_weights)

    def bits_per_weight(self) -> Tensor:
        """The network's bits over the float network's weight count; differentiable in every b."""
        return self.bits() / self.float_weights

    @torch.no_grad()
    def report(self) -> SizeReport:
        """Channels, weights and bits (real-valued and deployable) per layer and in total, now."""
        bits = [b.detach().float() for b in self._bits()]
        counts, sparse = self._live_inputs([b > 0 for b in bits])
        layers = []
        for (name, module), b, c, s in zip(self.layers.items(), bits, counts, sparse):
            alive = b > 0
            index = float(_index_bits(b, c, s))
            layers.append(
                LayerSize(
                    name=name,
                    channels=self.original[name][0],
                    channels_alive=int(alive.sum()),
                    weights=self.original[name][1],
                    weights_kept=int((c * alive).sum()),
                    bits=float((b.relu() * c).sum()) + index,
                    deployable_bits=int((integer_bits(integer_weights(module)[0]) * c).sum()) + int(index),
                )
            )
        return SizeReport(layers, self.float_weights)


def weighted_sum(layer_bits: Mapping[str, Tensor], layer_weights: Mapping[str, float] | None = None) -> Tensor:
    """The layers' bits summed, each times its factor in `layer_weights` (1 for the others), e.g. its channels'
    latency (`core.widths.latency_weights`)."""
    return sum(bits * (layer_weights or {}).get(name, 1.0) for name, bits in layer_bits.items())


def _index_bits(b: Tensor, kept: Tensor, sparse: bool) -> Tensor:
    """2 bits of position per kept weight of the alive channels of a 2:4-sparse layer."""
    return 2 * (kept * (b.detach() > 0)).sum() if sparse else torch.zeros((), device=b.device)


@dataclass(kw_only=True)
class GammaSchedule:
    """The weight of the size term: optional linear warm-up, optionally a budget of bits per weight.

    With a target and no band, gamma switches on while the network is above it and off once it is at or below it
    (a bang-bang controller; the size term becomes gamma * max(bits_per_weight - target, 0)): below the target
    the task gradient alone moves the bit depths. Adam's momentum still carries them past a target far below the
    start (2 -> 1 bit per weight ended at 0.65). With a band (a fraction of the target), gamma is proportional to
    the distance from the band's floor instead: full at the target and above, 0 at target * (1 - band), and
    negative below, down to -gamma at target * (1 - 2 band). The run settles inside the band, under the budget,
    and bits lost past it flow back to the live channels.
    """

    gamma: float
    warmup_steps: int = 0
    target_bits_per_weight: float | None = None
    band: float = 0.0
    step: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma={self.gamma} must be a finite number >= 0 (0 turns the size term off).")
        if self.warmup_steps < 0:
            raise ValueError(f"gamma_warmup_steps={self.warmup_steps} must be >= 0.")
        target = self.target_bits_per_weight
        if target is not None and not (math.isfinite(target) and target > 0):
            raise ValueError(f"target_bits_per_weight={target} must be a finite number > 0 (or None for no budget).")
        if not (math.isfinite(self.band) and 0 <= self.band < 1):
            raise ValueError(f"budget_band={self.band} must be in [0, 1): a fraction of the budget (0: on/off).")

    def value(self, bits_per_weight: float) -> float:
        """Gamma for the current step, given the network's bits per weight now."""
        gamma = self.gamma
        if self.warmup_steps and self.step < self.warmup_steps:
            gamma *= (self.step + 1) / self.warmup_steps
        target = self.target_bits_per_weight
        if target is None:
            return gamma
        if not self.band:
            return gamma if bits_per_weight > target else 0.0
        return gamma * min(max((bits_per_weight - target) / (self.band * target) + 1.0, -1.0), 1.0)

    def state_dict(self) -> dict:
        """The step count (where the warm-up is), for a checkpoint."""
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the checkpoint's step."""
        self.step = int(state["step"])
