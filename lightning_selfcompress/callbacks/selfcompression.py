"""Lightning adapter for self-compression (`core.compressor.SelfCompressor`): hooks, logging, checkpoint, ranks."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from ..core.compressor import SelfCompressor
from ..core.inputs import model_input
from ..core.size import SizeReport
from ..report import print_size_table
from .strategies import check_strategy, half_dtype

__all__ = ["SelfCompression"]


class SelfCompression(Callback):
    """Every selected Conv/Linear layer learns a bit depth and an exponent per output channel, while a size term
    (gamma x average bits per original weight) pulls the bit depths down. The LightningModule is not changed.

    Takes every argument of `SelfCompressor` (gamma, the size budget, the layers, the quantizer, the whole-bit
    phase, latency weighting), which does the work; this drives it from Lightning's hooks, logs the size, keeps its
    state in checkpoints, and measures latency weights on rank 0 alone (on the first training batch) so that every
    replica pulls its bits alike.
    """

    def __init__(self, gamma: float = 0.01, **options: Any) -> None:
        self.compressor = SelfCompressor(gamma, **options)
        self.last_report: SizeReport | None = None

    @property
    def method(self) -> str:
        """What this trains, for reports and plots."""
        return self.compressor.method

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before configure_optimizers (so the user's optimizer holds b and e) and before a checkpoint's weights load.
        check_strategy(trainer, "SelfCompression")
        self.compressor.attach(pl_module)

    def report(self) -> SizeReport:
        """The size of the model this compresses, now."""
        return self.compressor.report()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.compressor.use(*trainer.optimizers)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        compressor = self.compressor
        if not compressor.traced:  # size accounting follows the channels on what forward takes
            try:
                example = model_input(pl_module, batch, "SelfCompression's size accounting")
            except ValueError:
                example = None  # counted as an upper bound, with a warning that says so
            compressor.trace(example)
        # on rank 0, then broadcast: every replica pulls alike; fixed-bit training has no size term to weight
        if compressor.latency_weight and compressor.learn_bits and compressor.layer_weights is None:
            measured = None
            if trainer.is_global_zero:
                example = model_input(pl_module, batch, "SelfCompression(latency_weight)")
                measured = compressor.measure_layer_weights(example, half_dtype(trainer))
                rank_zero_info(f"SelfCompression: each layer's bits weighted by its latency: {measured}")
            compressor.layer_weights = trainer.strategy.broadcast(measured, src=0)
        compressor.start_step(trainer.global_step, trainer.estimated_stepping_batches)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Called once per optimizer step, after the accumulated backward passes and after AMP unscaling.
        self.compressor.add_size_gradient(optimizer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        compressor = self.compressor
        compressor.end_step()
        metrics = {"selfcompress/size_loss": compressor.size_loss, "selfcompress/gamma": compressor.gamma}
        if not math.isnan(compressor.bits_per_weight):
            metrics["selfcompress/bits_per_weight"] = compressor.bits_per_weight
        # The deployable size reads every quantized weight: only on the steps Lightning writes (a private flag, so
        # every step where it is missing).
        if getattr(trainer._logger_connector, "should_update_logs", True):
            report = compressor.report()
            metrics["selfcompress/bits_per_weight"] = report.bits_per_weight
            metrics["selfcompress/deployable_bits_per_weight"] = report.deployable_bits_per_weight
            metrics["selfcompress/weights_kept"] = float(report.weights_kept)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        if not math.isnan(bits := metrics.get("selfcompress/bits_per_weight", math.nan)):
            pl_module.log("bits_per_weight", bits, on_step=True, on_epoch=False, prog_bar=True, logger=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = self.compressor.report()
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
        self.last_report = self.compressor.report()
        self._print(self.last_report)

    @rank_zero_only
    def _print(self, report: SizeReport) -> None:
        print_size_table(report, title="Self-compression: size per layer")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.compressor.finish()  # the model leaves the run as it came: every b trainable, optimizers as built

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.compressor.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored after setup(): the weight count of the float network, which the model no longer has after surgery.
        self.compressor.load_state_dict(state_dict)
