"""Self-compression's lifecycle over one model, for any training loop: the quantizers, the size term's gradient, the
size budget, the whole-bit phase and the bound on b. `SelfCompression` drives it from Lightning's hooks; a plain
PyTorch loop drives it the same way:

    compressor = SelfCompressor(gamma=0.15, target_bits_per_weight=1.9, init_bits=2, freeze_bits_at=0.8)
    compressor.attach(model, example)                           # before the optimizer: it must hold b and e
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    compressor.use(optimizer)                                   # it holds b and e (their own rate, if set)
    for step, (x, y) in enumerate(batches):
        compressor.start_step(step, total_steps)                # the whole-bit phase, when its time comes
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        compressor.add_size_gradient(optimizer)                 # once per optimizer step, after backward
        optimizer.step()
        compressor.end_step()                                   # b back under max_bits
    compressor.finish()
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_choice, check_flag, check_fraction
from .groups import ChannelGraph
from .optim import HyperparameterOverride
from .quant import (
    QuantizationConfig,
    attach_quantizers,
    clamp_bits,
    freeze_bits,
    quantized_layers,
    quantizer_parameters,
    snap_bits,
)
from .size import GammaSchedule, SizeModel, SizeReport, layer_shapes, weighted_sum
from .widths import BACKENDS, latency_tables, latency_weights

__all__ = ["SelfCompressor"]


class SelfCompressor:
    """Every selected Conv/Linear layer learns a bit depth and an exponent per output channel, while a size term
    (gamma x average bits per original weight) pulls the bit depths down.

    Args:
        gamma: weight of the size term (the paper's compression factor). 0 trains the quantizers without pressure.
        target_bits_per_weight: a budget in deployable bits per weight (whole bits per channel, as a file stores
            them): the size term acts only while the network is above it.
        budget_band: 0 switches the size term on above the budget and off below it; a fraction of the budget (0.05)
            is a band under it: gamma falls from full at the budget to 0 at its floor and turns negative below, so
            the run settles in the band instead of overshooting a low budget.
        gamma_warmup_steps: ramp gamma linearly from 0 over this many optimizer steps.
        layer_types: which layer classes to quantize (class names).
        include: glob patterns on module names: the layers to quantize among those.
        exclude: glob patterns on module names: layers left float.
        init_bits: starting bit depth (8: the quantized network starts within about 1% of the float one).
        max_bits: the largest bit depth b may reach (8: every layer exports as int8; None: no bound).
        min_bits: the smallest (None: none, channels die at 0; 1: every channel keeps at least one bit, so the size
            term trades bits between channels without removing any: mixed precision without pruning). The channels
            the model outputs (a classifier's logits) keep at least one bit whatever it is: no class is lost.
        init_exponent: starting exponent; None picks it per channel by `init_scale`.
        init_scale: "absmax" (the bit range spans the channel's largest weight) or "lsq" (LSQ's step, 2 mean|w| /
            sqrt(2^(b-1) - 1), for fixed low bit depths).
        grid: "integer" (the paper's, {-2, -1, 0, 1} at 2 bits) or "midrise" (levels at half steps, symmetric: 1 bit
            is a binary channel, so a channel can go below 2 bits and still be useful; no zero level, so not with
            2:4 sparsity).
        quantizer_lr: learning rate of b and e at the start of the LR schedule (None: that of their param group).
        quantizer_weight_decay: weight decay of b and e (0 unless asked: decay would drag e towards 1.0 scales).
        learn_bits: False keeps every b at `init_bits` (a whole number) and learns only the scales: fixed-bit
            quantization-aware training with a learned step (LSQ-style), the baseline self-compression must beat.
        freeze_bits_at: the whole-bit phase: after this fraction of the run's optimizer steps, each b is set to the
            whole bits its channel's integers need and frozen, and the size term stops; weights and scales train on
            at exactly the deployable size. A run over its budget then waits until it is within it, for at most
            half of the phase. None: bits train to the end.
        int8_activations: also quantize each layer's input to int8 with a learned per-tensor step (LSQ), so that the
            exported file runs integer kernels (TensorRT, ONNX Runtime's QLinearConv) at the accuracy it trained with,
            without calibration. A layer reading fewer than 4 channels (the image) keeps float inputs. A residual
            Add that feeds such a layer has both its inputs stepped too (`residual_steps`), so that it adds in int8.
        activation_runtime: whom those steps are for: "tensorrt" (symmetric int8, the only form TensorRT takes) or
            "onnxruntime" (a non-negative input on the uint8 grid: twice the resolution, and ONNX Runtime fuses the
            ReLU before it into its integer kernel; such a file does not build a TensorRT engine). Export with the
            same `runtime`.
        latency_weight: 0 (the paper's size term: every weight's bits count alike) to 1: each layer's bits weighted
            by the time its channels cost, measured on `latency_backend` (`core.widths.latency_weights`, the
            tables ChannelSurgeon's latency steps use, cached), so that gamma trades accuracy for measured time;
            between, a mix. Measured by `measure_layer_weights`.
        latency_backend: where that time is measured, one of `core.widths.BACKENDS`: "onnxruntime-cpu" (float
            kernels on this CPU), "onnxruntime-cpu-int8" (its integer kernels), "tensorrt-int8" (TensorRT's int8
            engines on this CUDA GPU) or "torch" (PyTorch on the model's device: a GPU's time where it trains on one).
    """

    def __init__(
        self,
        gamma: float = 0.01,
        *,
        target_bits_per_weight: float | None = None,
        budget_band: float = 0.0,
        gamma_warmup_steps: int = 0,
        layer_types: Sequence[str] = ("Conv1d", "Conv2d", "Conv3d", "Linear"),
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        init_bits: float = 8.0,
        max_bits: float | None = 8.0,
        min_bits: float | None = None,
        init_exponent: float | None = None,
        quantizer_lr: float | None = None,
        quantizer_weight_decay: float = 0.0,
        init_scale: str = "absmax",
        grid: str = "integer",
        learn_bits: bool = True,
        freeze_bits_at: float | None = None,
        int8_activations: bool = False,
        activation_runtime: str = "tensorrt",
        latency_weight: float = 0.0,
        latency_backend: str = "onnxruntime-cpu",
    ) -> None:
        self.schedule = GammaSchedule(
            gamma=gamma, warmup_steps=gamma_warmup_steps, target_bits_per_weight=target_bits_per_weight,
            band=budget_band,
        )  # fmt: skip
        self.config = QuantizationConfig(
            layer_types=tuple(layer_types),
            include=tuple(include),
            exclude=tuple(exclude),
            init_bits=init_bits,
            init_exponent=init_exponent,
            init_scale=init_scale,
            grid=grid,
            int8_activations=int8_activations,
            activation_runtime=activation_runtime,
        )
        check_flag("learn_bits", learn_bits)
        check_flag("int8_activations", int8_activations)
        if not learn_bits and (gamma != 0 or init_bits != int(init_bits) or freeze_bits_at is not None):
            raise ValueError(
                f"learn_bits=False is fixed-bit training at init_bits={init_bits}: it needs a whole init_bits, "
                f"gamma=0 (got {gamma}) and no freeze_bits_at (got {freeze_bits_at}); the bits never move."
            )
        fraction = isinstance(freeze_bits_at, (int, float)) and not isinstance(freeze_bits_at, bool)
        if freeze_bits_at is not None and not (fraction and 0 < freeze_bits_at <= 1):
            raise ValueError(f"freeze_bits_at={freeze_bits_at!r} must be a fraction of the run in (0, 1], or None.")
        if max_bits is not None and not (math.isfinite(max_bits) and max_bits >= max(init_bits, 2)):
            raise ValueError(f"max_bits={max_bits} must be a number >= init_bits ({init_bits}) and >= 2, or None.")
        if quantizer_lr is not None and not (math.isfinite(quantizer_lr) and quantizer_lr > 0):
            raise ValueError(f"quantizer_lr={quantizer_lr} must be a finite number > 0, or None to use the group's.")
        if not (math.isfinite(quantizer_weight_decay) and quantizer_weight_decay >= 0):
            raise ValueError(f"quantizer_weight_decay={quantizer_weight_decay} must be a finite number >= 0.")
        if min_bits is not None and not (math.isfinite(min_bits) and 0 < min_bits <= init_bits):
            raise ValueError(f"min_bits={min_bits} must be a number in (0, init_bits={init_bits}], or None.")
        self.max_bits, self.min_bits = max_bits, min_bits
        self.learn_bits = learn_bits
        self.freeze_bits_at = freeze_bits_at
        self.quantizer_lr = quantizer_lr
        self.quantizer_weight_decay = quantizer_weight_decay
        self.latency_weight = check_fraction("latency_weight", latency_weight, meaning="0: bits alone, 1: time")
        self.latency_backend = check_choice("latency_backend", latency_backend, BACKENDS)
        self.layer_weights: dict[str, float] | None = None  # per layer, its bits' factor in the size term
        self.bits_frozen = False
        self.model: nn.Module | None = None
        self._size: SizeModel | None = None
        self._original: dict[str, tuple[int, int]] = {}  # per layer (channels, weights) as first attached
        self.traced = False  # whether size accounting was given its example input (or told there is none)
        self._overrides: list[HyperparameterOverride] = []
        # What the last step did, for logging: NaN until a step with the size term.
        self.bits_per_weight = self.gamma = self.size_loss = math.nan

    @property
    def method(self) -> str:
        """What this trains, for reports and plots."""
        return "self-compression" if self.learn_bits else f"fixed {self.config.init_bits:g}-bit (LSQ)"

    def attach(self, model: nn.Module, example_input: Tensor | None = None) -> None:
        """Quantizers on the selected layers of `model` (again after a surgery or a resume: layers that have them keep
        them); before the optimizer is built and a checkpoint's weights load. `example_input` (a sample or two of what
        forward takes; or later, `trace`) lets size accounting follow the channels: without it every input counts."""
        attach_quantizers(model, self.config)
        self.model = model
        self._original = self._original or layer_shapes(model)  # before a checkpoint's surgery history replays
        if self._size is not None and set(self._size.layers) != set(quantized_layers(model)):
            self._size = self._size.rebuilt(model)
        if example_input is not None:
            self.trace(example_input)

    def trace(self, example_input: Tensor | None) -> None:
        """Follow the channels on `example_input` for size accounting; before the first step. None: every input
        channel counts as live (with a warning)."""
        self._size = SizeModel(self._attached(), example_input, original=self._original)
        self.traced = True

    def _attached(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("SelfCompressor.attach(model) first.")
        return self.model

    @property
    def size(self) -> SizeModel:
        """The size accounting of the model now: built anew after a surgeon changed layer shapes."""
        model = self._attached()
        if self._size is None:
            self._size = SizeModel(model, original=self._original)
        elif self._size.stale():
            self._size = self._size.rebuilt(model)
        return self._size

    def report(self) -> SizeReport:
        """The size of the model now."""
        return self.size.report()

    def use(self, *optimizers: torch.optim.Optimizer) -> None:
        """Before the first step (and after `load_state_dict`, on a resume): the `optimizers` that train the model
        must hold every b and e; they step them at `quantizer_lr` and `quantizer_weight_decay` (each is left as built
        outside its steps). Fixed bits, and bits frozen before a resume, are frozen from here on."""
        layers = quantized_layers(self._attached())
        held = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in self.model.named_parameters() if ".weight_quantizer." in n and id(p) not in held]
        if missing:
            raise RuntimeError(
                f"No optimizer holds the quantizer parameters {missing[:4]}{' ...' if len(missing) > 4 else ''}. "
                "They exist once the quantizers are attached; build the optimizer after that from the model's "
                "parameters (or include every '*.weight_quantizer.*' parameter) so they are trained."
            )
        ours = quantizer_parameters(self.model)
        self._overrides += [
            HyperparameterOverride(optimizer, ours, self.quantizer_lr, self.quantizer_weight_decay)
            for optimizer in optimizers
        ]
        if not self.learn_bits or self.bits_frozen:
            freeze_bits(layers)

    def measure_layer_weights(self, example: Tensor, autocast: torch.dtype | None = None) -> dict[str, float]:
        """Per layer, the factor of its bits in the size term: its channels' latency, mixed by `latency_weight`.
        `autocast`: the half type a mixed-precision run computes in (the "torch" backend times in it)."""
        example = example.detach()[:2]
        autocast = autocast if self.latency_backend == "torch" else None
        tables = latency_tables(ChannelGraph(self.model, example), example, backend=self.latency_backend,
                                autocast=autocast)
        measured = latency_weights(tables, self.size.original)
        return {name: 1 - self.latency_weight + self.latency_weight * w for name, w in measured.items()}

    def start_step(self, step: int, total_steps: int) -> None:
        """Before optimizer step `step` of `total_steps`: enter the whole-bit phase when its time has come (and the
        run is within its budget, or has waited half the phase for it)."""
        if self.bits_frozen or self.freeze_bits_at is None or step < self.freeze_bits_at * total_steps:
            return
        budget = self.schedule.target_bits_per_weight
        over = budget is not None and self.report().deployable_bits_per_weight > budget
        if over and step < (1 + self.freeze_bits_at) / 2 * total_steps:
            return
        snap_bits(self.size.layers)
        freeze_bits(self.size.layers)
        self.bits_frozen = True
        self.gamma = self.size_loss = 0.0

    def add_size_gradient(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Add the size term's gradient to the bit depths (those `optimizer` holds), once per optimizer step, after
        the backward passes (and after AMP unscaling). Refuses non-finite weights, naming them."""
        size = self.size
        held = None if optimizer is None else {id(p) for group in optimizer.param_groups for p in group["params"]}
        bits = [m.weight_quantizer.bits for m in size.layers.values()]
        bits = [b for b in bits if b.requires_grad and (held is None or id(b) in held)]
        if not bits:
            return
        self._check_finite()
        with torch.enable_grad(), torch.autocast(bits[0].device.type, enabled=False):
            per_layer = size.layer_bits()  # once: the size logged and the (latency-weighted) size pulled
            self.bits_per_weight = (weighted_sum(per_layer) / size.float_weights).item()
            budget = self.schedule.target_bits_per_weight is not None  # held in whole bits: what the file stores
            now = size.report().deployable_bits_per_weight if budget else self.bits_per_weight
            self.gamma = self.schedule.value(now)
            pulled = weighted_sum(per_layer, self.layer_weights) / size.float_weights
            grads = torch.autograd.grad(self.gamma * pulled, bits, allow_unused=True)
        for b, g in zip(bits, grads):
            if g is not None:
                b.grad = g if b.grad is None else b.grad.add_(g)
        self.size_loss = self.gamma * self.bits_per_weight
        self.schedule.step += 1

    def end_step(self) -> None:
        """After the optimizer step: every b back within `min_bits` and `max_bits`; the channels the model outputs
        (a classifier's logits) at 1 bit or more, so that no class is lost."""
        if self.learn_bits and not self.bits_frozen:
            size = self.size
            if self.max_bits is not None or self.min_bits is not None:
                clamp_bits(size.layers, self.max_bits, self.min_bits)
            outputs = {name: size.layers[name] for name in size.output_layers}
            clamp_bits(outputs, None, max(self.min_bits or 0.0, 1.0))

    def finish(self) -> None:
        """The end of training: every b trainable again, the optimizers as the user built them."""
        if self._size is not None:
            freeze_bits(self._size.layers, frozen=False)
        for override in self._overrides:
            override.remove()
        self._overrides = []

    def _check_finite(self) -> None:
        layers = self.size.layers.values()
        tensors = [t for m in layers for t in (m.weight, m.weight_quantizer.bits, m.weight_quantizer.exponent)]
        if torch.stack([t.detach().isfinite().all() for t in tensors]).all():
            return
        named = [(n, p) for n, p in self.model.named_parameters() if n.endswith(".weight") or ".weight_quantizer." in n]
        bad = [n for n, p in named if not p.detach().isfinite().all()]
        weights = [n for n in bad if n.endswith(".weight")]  # a weight spoils its quantizer: name the weight first
        spoiled = f" (and so in {[n for n in bad if n not in weights]})" if weights and len(bad) > len(weights) else ""
        raise FloatingPointError(
            f"Non-finite values in {weights or bad}{spoiled}. Lower the learning rate or quantizer_lr, or check the "
            "data and the loss for NaN or inf."
        )

    def state_dict(self) -> dict[str, Any]:
        """The size schedule's step, the float network's weight count and whether bits are frozen."""
        return {
            "schedule": self.schedule.state_dict(),
            "float_weights": self._size.float_weights if self._size else None,
            "bits_frozen": self.bits_frozen,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """After `attach`: the float network's weight count, which a cut model no longer has, is restored too."""
        self.schedule.load_state_dict(state_dict["schedule"])
        self.bits_frozen = bool(state_dict.get("bits_frozen", False))
        if self._size is not None and state_dict.get("float_weights"):
            self._size.float_weights = int(state_dict["float_weights"])
