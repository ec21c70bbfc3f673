"""Lightning adapter for self-compression: attach quantizers, add the size term's gradient, log, checkpoint."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from ..core.checks import check_flag, check_fraction
from ..core.groups import ChannelGraph
from ..core.inputs import model_input
from ..core.optim import HyperparameterOverride
from ..core.quant import (
    QuantizationConfig,
    attach_quantizers,
    clamp_bits,
    freeze_bits,
    quantized_layers,
    quantizer_parameters,
    snap_bits,
)
from ..core.size import GammaSchedule, SizeModel, SizeReport, weighted_sum
from ..core.widths import latency_tables, latency_weights
from ..report import print_size_table

__all__ = ["SelfCompression"]


class SelfCompression(Callback):
    """Every selected Conv/Linear layer learns a bit depth and an exponent per output channel, while a size term
    (gamma x average bits per original weight) pulls the bit depths down. The LightningModule is not changed.

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
            without calibration.
        latency_weight: 0 (the paper's size term: every weight's bits count alike) to 1: each layer's bits weighted
            by the time its channels cost, measured in ONNX Runtime on this CPU (`core.widths.latency_weights`, the
            tables ChannelSurgeon's latency steps use, cached), so that gamma trades accuracy for measured time;
            between, a mix. Measured once, on the first training batch.
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
        init_exponent: float | None = None,
        quantizer_lr: float | None = None,
        quantizer_weight_decay: float = 0.0,
        init_scale: str = "absmax",
        grid: str = "integer",
        learn_bits: bool = True,
        freeze_bits_at: float | None = None,
        int8_activations: bool = False,
        latency_weight: float = 0.0,
    ) -> None:
        self.schedule = GammaSchedule(gamma, gamma_warmup_steps, target_bits_per_weight, budget_band)
        self.config = QuantizationConfig(
            layer_types=tuple(layer_types),
            include=tuple(include),
            exclude=tuple(exclude),
            init_bits=init_bits,
            init_exponent=init_exponent,
            init_scale=init_scale,
            grid=grid,
            int8_activations=int8_activations,
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
        self.max_bits = max_bits
        self.learn_bits = learn_bits
        self.freeze_bits_at = freeze_bits_at
        self.bits_frozen = False
        if quantizer_lr is not None and not (math.isfinite(quantizer_lr) and quantizer_lr > 0):
            raise ValueError(f"quantizer_lr={quantizer_lr} must be a finite number > 0, or None to use the group's.")
        if not (math.isfinite(quantizer_weight_decay) and quantizer_weight_decay >= 0):
            raise ValueError(f"quantizer_weight_decay={quantizer_weight_decay} must be a finite number >= 0.")
        self.latency_weight = check_fraction("latency_weight", latency_weight, meaning="0: bits alone, 1: time")
        self.layer_weights: dict[str, float] | None = None  # per layer, its bits' factor in the size term
        self.quantizer_lr = quantizer_lr
        self.quantizer_weight_decay = quantizer_weight_decay
        self.size: SizeModel | None = None
        self.last_report: SizeReport | None = None
        self._overrides: list[HyperparameterOverride] = []
        self._bits_per_weight = float("nan")
        self._size_loss = float("nan")
        self._gamma = float("nan")

    @property
    def method(self) -> str:
        """What this trains, for reports and plots."""
        return "self-compression" if self.learn_bits else f"fixed {self.config.init_bits:g}-bit (LSQ)"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before configure_optimizers (so the user's optimizer holds b and e) and before a checkpoint's weights load.
        attach_quantizers(pl_module, self.config)
        if self.size is None or set(self.size.layers) != set(quantized_layers(pl_module)) or self.size.stale():
            self.size = self.size.rebuilt(pl_module) if self.size else SizeModel(pl_module)

    def report(self, pl_module: pl.LightningModule) -> SizeReport:
        """The size of `pl_module` now."""
        return self._current_size(pl_module).report()

    def _current_size(self, pl_module: pl.LightningModule) -> SizeModel:
        """The size model, rebuilt after a surgeon (ChannelSurgeon) changed layer shapes."""
        if self.size.stale():
            self.size = self.size.rebuilt(pl_module)
        return self.size

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [n for n, p in pl_module.named_parameters() if ".weight_quantizer." in n and id(p) not in held]
        if missing:
            raise RuntimeError(
                f"No optimizer holds the quantizer parameters {missing[:4]}{' ...' if len(missing) > 4 else ''}. "
                "SelfCompression adds them in setup(), before configure_optimizers(); build the optimizer from "
                "self.parameters() (or include every '*.weight_quantizer.*' parameter) so they are trained."
            )
        if not self.learn_bits or self.bits_frozen:  # also after a resume in the whole-bit phase
            freeze_bits(quantized_layers(pl_module))
        ours = quantizer_parameters(pl_module)
        self._overrides = [
            HyperparameterOverride(opt, ours, self.quantizer_lr, self.quantizer_weight_decay) for opt in trainer.optimizers
        ]

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        if self.latency_weight and self.layer_weights is None:  # timed on rank 0 alone: every replica pulls alike
            measured = self._measure_layer_weights(pl_module, batch) if trainer.is_global_zero else None
            self.layer_weights = trainer.strategy.broadcast(measured, src=0)
        if self.bits_frozen or self.freeze_bits_at is None:
            return
        total = trainer.estimated_stepping_batches
        if trainer.global_step >= self.freeze_bits_at * total:
            size, budget = self._current_size(pl_module), self.schedule.target_bits_per_weight
            over = budget is not None and size.report().deployable_bits_per_weight > budget
            if over and trainer.global_step < (1 + self.freeze_bits_at) / 2 * total:
                return  # the size term goes on until the run is within its budget, for at most half the phase
            layers = size.layers
            snap_bits(layers)
            freeze_bits(layers)
            self.bits_frozen = True
            self._gamma = self._size_loss = 0.0

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Called once per optimizer step, after the accumulated backward passes and after AMP unscaling.
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        size = self._current_size(pl_module)
        bits = [b for m in size.layers.values() if id(b := m.weight_quantizer.bits) in held and b.requires_grad]
        if not bits:
            return
        self._check_finite(pl_module)
        with torch.enable_grad(), torch.autocast(bits[0].device.type, enabled=False):
            per_layer = size.layer_bits()  # once: the size logged and the (latency-weighted) size pulled
            bits_per_weight = weighted_sum(per_layer) / size.float_weights
            self._bits_per_weight = bits_per_weight.item()
            budget = self.schedule.target_bits_per_weight is not None  # held in whole bits: what the file stores
            self._gamma = self.schedule.value(
                size.report().deployable_bits_per_weight if budget else self._bits_per_weight
            )
            pulled = weighted_sum(per_layer, self.layer_weights) / size.float_weights
            grads = torch.autograd.grad(self._gamma * pulled, bits, allow_unused=True)
        for b, g in zip(bits, grads):
            if g is not None:
                b.grad = g if b.grad is None else b.grad.add_(g)
        self._size_loss = self._gamma * self._bits_per_weight
        self.schedule.step += 1

    def _measure_layer_weights(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, float]:
        example = model_input(pl_module, batch, "SelfCompression(latency_weight)").detach()[:2]
        tables = latency_tables(ChannelGraph(pl_module, example), example.cpu())
        measured = latency_weights(tables, self._current_size(pl_module).original)
        mixed = {name: 1 - self.latency_weight + self.latency_weight * w for name, w in measured.items()}
        rank_zero_info(f"SelfCompression: each layer's bits weighted by its latency: {mixed}")
        return mixed

    def _check_finite(self, pl_module: pl.LightningModule) -> None:
        layers = self.size.layers.values()
        tensors = [t for m in layers for t in (m.weight, m.weight_quantizer.bits, m.weight_quantizer.exponent)]
        if torch.stack([t.detach().isfinite().all() for t in tensors]).all():
            return
        named = [(n, p) for n, p in pl_module.named_parameters() if n.endswith(".weight") or ".weight_quantizer." in n]
        bad = [n for n, p in named if not p.detach().isfinite().all()]
        weights = [n for n in bad if n.endswith(".weight")]  # a weight spoils its quantizer: name the weight first
        spoiled = f" (and so in {[n for n in bad if n not in weights]})" if weights and len(bad) > len(weights) else ""
        raise FloatingPointError(
            f"Non-finite values in {weights or bad}{spoiled}. Lower the learning rate or quantizer_lr, or check the "
            "data and the loss for NaN or inf."
        )

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.max_bits is not None and self.learn_bits and not self.bits_frozen:
            clamp_bits(self._current_size(pl_module).layers, self.max_bits)
        metrics = {"selfcompress/size_loss": self._size_loss, "selfcompress/gamma": self._gamma}
        if not math.isnan(self._bits_per_weight):
            metrics["selfcompress/bits_per_weight"] = self._bits_per_weight
        # The deployable size reads every quantized weight: only on the steps Lightning writes (a private flag, so
        # every step where it is missing).
        if getattr(trainer._logger_connector, "should_update_logs", True):
            report = self._current_size(pl_module).report()
            metrics["selfcompress/bits_per_weight"] = report.bits_per_weight
            metrics["selfcompress/deployable_bits_per_weight"] = report.deployable_bits_per_weight
            metrics["selfcompress/weights_kept"] = float(report.weights_kept)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if not math.isnan(bits := metrics.get("selfcompress/bits_per_weight", math.nan)):
            pl_module.log("bits_per_weight", bits, on_step=True, on_epoch=False, prog_bar=True, logger=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = self._current_size(pl_module).report()
        pl_module.log_dict(
            {
                "selfcompress/channels_alive": float(report.channels_alive),
                "selfcompress/weights_kept": float(report.weights_kept),
                "selfcompress/size_bytes": float(report.size_bytes),
                "selfcompress/percent_of_float32": report.percent_of_float32,
            }
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last_report = self._current_size(pl_module).report()
        self._print(self.last_report)

    @rank_zero_only
    def _print(self, report: SizeReport) -> None:
        print_size_table(report, title="Self-compression: size per layer")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.size is not None:
            freeze_bits(self.size.layers, frozen=False)  # the model leaves the run as it came: every b trainable
        for override_ in self._overrides:
            override_.remove()
        self._overrides = []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.state_dict(),
            "float_weights": self.size.float_weights if self.size else None,
            "bits_frozen": self.bits_frozen,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored after setup(): the weight count of the float network, which the model no longer has after surgery.
        self.schedule.load_state_dict(state_dict["schedule"])
        self.bits_frozen = bool(state_dict.get("bits_frozen", False))
        if self.size is not None and state_dict.get("float_weights"):
            self.size.float_weights = int(state_dict["float_weights"])
