"""Lightning adapter: at the end of fit, export the compressed model to ONNX (and TensorRT where it exists)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..core.export import check_runtime_fits
from ..core.inputs import image_batch, model_input
from ..export_report import ExportOptions, check_output_path, export_and_report, layer_shapes, parameter_count
from .surgeon import ChannelSurgeon

__all__ = ["CompressedExport"]


class CompressedExport(Callback):
    """Writes `path` (ONNX, each quantized layer's weight as exact int8 behind a DequantizeLinear), `path` with suffix
    .engine where TensorRT and a GPU exist, and a JSON report beside them, after `trainer.fit`, on rank zero.

    Args:
        path: the .onnx file to write.
        int4: store layers whose integers all fit 4 bits as int4 (ONNX opset 21); such files run in ONNX Runtime, not
            TensorRT (its INT4 is block-wise), so no engine is built.
        calibrate_batches: > 0 adds per-tensor int8 activation Q/DQ calibrated on that many training batches (needs a
            tolerance >= 0.01, or None).
        parity_batches: training batches on which ONNX Runtime must match PyTorch.
        tolerance: the largest relative output error accepted (None: measure only); past it, fit ends in an error.
        engine: "auto" (build a TensorRT engine where possible, else the report says why), "always" (fail where not)
            or "never".
        fp16: let TensorRT pick FP16 kernels (TensorRT 10 only: its weakly typed networks).
        latency_batches: batch sizes at which latency is measured.
        latency_runs: timed runs per batch size (the median is reported).
        runtime: the runtime the int8 activations are laid out for: "tensorrt" (symmetric, the only form TensorRT
            takes) or "onnxruntime" (uint8, a ReLU's output over the whole range, which ONNX Runtime fuses into its
            integer kernels; no engine). Matters only with int8 activations; trained for ONNX Runtime
            (`activation_runtime="onnxruntime"`), they export for it alone (an error at the start of fit otherwise).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        int4: bool = False,
        calibrate_batches: int = 0,
        parity_batches: int = 2,
        tolerance: float | None = 1e-4,
        engine: str = "auto",
        fp16: bool = False,
        latency_batches: Sequence[int] = (1, 64),
        latency_runs: int = 30,
        runtime: str = "tensorrt",
    ) -> None:
        self.path = check_output_path(path)  # here too, so that a wrong name fails before training, not after
        self.options = ExportOptions(
            int4=int4, calibrate_batches=calibrate_batches, parity_batches=parity_batches, tolerance=tolerance,
            engine=engine, fp16=fp16, latency_batches=tuple(latency_batches), latency_runs=latency_runs,
            runtime=runtime,
        )  # fmt: skip
        self.before: dict[str, tuple[int, int]] = {}
        self.parameters_before: int | None = None
        self.report: dict[str, Any] | None = None
        self.error: Exception | None = None  # what the export at the end of fit raised (then raised on)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before any surgery of this run (and before a checkpoint's history is replayed, which happens after setup).
        if not self.before:
            self.before = layer_shapes(pl_module)
            self.parameters_before = parameter_count(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_runtime_fits(pl_module, self.options.runtime)  # not only after training

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        wanted = max(self.options.calibrate_batches, self.options.parity_batches)
        loaded = list(itertools.islice(trainer.train_dataloader, wanted))  # real data, to calibrate and compare on
        batches = [x for x in map(image_batch, loaded) if x is not None]
        batches = batches or [model_input(pl_module, loaded[0] if loaded else None, "CompressedExport")]
        surgeon = next((cb for cb in trainer.callbacks if isinstance(cb, ChannelSurgeon) and cb.surgeon), None)
        try:
            self.report = export_and_report(
                pl_module,
                self.path,
                batches,
                self.options,
                before=self.before,
                parameters_before=self.parameters_before,
                macs_before=surgeon.original_macs if surgeon else None,
            )
        except Exception as error:  # kept, so that a caller can still test and report the trained model
            self.error, self.report = error, {"path": str(self.path), "error": f"{type(error).__name__}: {error}"}
            raise
