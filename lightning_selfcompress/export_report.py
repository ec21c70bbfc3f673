"""Export a trained model and report what was gained: shared by the `CompressedExport` callback and `lsc-export`.

Writes `<name>.onnx`, the TensorRT engine `<name>.engine` where TensorRT and a GPU exist, and `<name>.json`; prints a
table. The report holds parameters, weight bits and storage per layer, channels per layer before/after, file sizes
(the file vs the same network exported with float32 weights), multiply-accumulates, parity errors and latency.

The engine comes last. With engine="auto" an engine that cannot be built is recorded in the report (why); with
"always" its error ends the call after the ONNX file is written (it passed all its checks) and before the report.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .check24 import check_onnx
from .core.checks import check_choice
from .core.export import RUNTIMES, export_onnx
from .core.groups import ChannelGraph, GraphError
from .core.latency import ort_kernels, ort_latency_ms
from .core.parity import onnx_session, reference_output
from .core.quant import quantized_layers
from .core.size import LayerShape
from .core.tensorrt import Engine, EngineBuildError, TensorRTUnavailable, build_engine
from .report import make_console, shape_cells, write_json

__all__ = ["ExportOptions", "check_output_path", "export_and_report", "layer_shapes", "parameter_count"]

ENGINE_CHOICES = ("auto", "always", "never")
INT4_NO_ENGINE = (
    "int4 files are for ONNX Runtime only: TensorRT's INT4 is weight-only and block-wise (blocks of 64 or 128 input "
    "channels), and this export writes INT4 per output channel"
)
ORT_LAYOUT_NO_ENGINE = (
    "runtime=onnxruntime lays int8 activations out for ONNX Runtime (uint8), which TensorRT "
    "does not take; export with runtime=tensorrt for an engine"
)
CALIBRATED_TOLERANCE = 0.01  # int8 activations change the outputs by about a percent


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """How to export. `engine`: "auto" builds a TensorRT engine where it can (else the report says why), "always" fails
    where it cannot, "never" skips it; int4 files get no engine. `calibrate_batches` > 0 adds int8 activation Q/DQ
    calibrated on that many batches, which needs a tolerance of at least 0.01 (or None), laid out for `runtime`
    ("tensorrt", or "onnxruntime": faster there, no engine; see `export_onnx`)."""

    int4: bool = False
    calibrate_batches: int = 0
    parity_batches: int = 2
    tolerance: float | None = 1e-4
    engine: str = "auto"
    fp16: bool = False
    latency_batches: Sequence[int] = (1, 64)
    latency_runs: int = 30
    runtime: str = "tensorrt"

    def __post_init__(self) -> None:
        check_choice("engine", self.engine, ENGINE_CHOICES)
        check_choice("runtime", self.runtime, RUNTIMES)
        if self.calibrate_batches < 0 or self.parity_batches < 1:
            raise ValueError(
                f"calibrate_batches={self.calibrate_batches} must be >= 0 and parity_batches={self.parity_batches} >= 1."
            )
        if not self.latency_batches or any(int(b) < 1 for b in self.latency_batches):
            raise ValueError(f"latency_batches={list(self.latency_batches)} must be batch sizes >= 1 (at least one).")
        if self.latency_runs < 1:
            raise ValueError(f"latency_runs={self.latency_runs} must be >= 1.")
        if self.tolerance is not None and not self.tolerance > 0:
            raise ValueError(f"tolerance={self.tolerance} must be > 0, or None to measure without a limit.")
        if self.calibrate_batches > 0 and self.tolerance is not None and self.tolerance < CALIBRATED_TOLERANCE:
            raise ValueError(
                f"calibrate_batches={self.calibrate_batches} with tolerance={self.tolerance}: int8 activations change "
                "the outputs by about a percent, so parity would always fail (after training). Set tolerance=null "
                "(measure only) or e.g. 0.05."
            )
        if self.int4 and self.engine == "always":
            raise ValueError(f"int4=True with engine='always': {INT4_NO_ENGINE}. Use engine='auto' or 'never' with "
                             "int4, or int4=False for a TensorRT engine.")  # fmt: skip
        if self.runtime == "onnxruntime" and self.engine == "always":
            raise ValueError(f"engine='always' with {ORT_LAYOUT_NO_ENGINE}.")


def check_output_path(path: str | Path) -> Path:
    """`path` as a Path, if it names an .onnx file (the engine and report take its name with .engine and .json) in
    a folder that can be written: checked before any training, so that a run does not end on an unwritable path."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(
            f"The output {str(path)!r} should end in .onnx: the engine and the report are written beside it with "
            "the suffixes .engine and .json."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise ValueError(
            f"The export cannot write to {str(path.parent)!r} ({type(error).__name__}: {error.strerror or error}): "
            "choose an export path in a folder you can write."
        ) from error
    return path


@dataclass
class _Reference:
    """The model as it was before compression removed anything: per layer (output channels, weights), and totals."""

    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    parameters: int | None = None
    macs: int | None = None


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every Conv/Linear layer's (output channels, weights)."""
    return {
        n: (m.weight.shape[0], m.weight.numel())
        for n, m in model.named_modules()
        if isinstance(m, (_ConvNd, nn.Linear))
    }


def parameter_count(model: nn.Module) -> int:
    """Parameters of the network itself, without the quantizers' b and e."""
    return sum(p.numel() for n, p in model.named_parameters() if ".weight_quantizer." not in f".{n}")


def macs(model: nn.Module, example: Tensor) -> int | None:
    """Multiply-accumulates per sample, from the channel graph; None where the model does not trace."""
    try:
        return ChannelGraph(model, example[:1]).macs()
    except GraphError:
        return None


def _layer_name(weight: str) -> str:
    """The layer a weight tensor of the file belongs to: `<layer>.weight_dequantized` or `<layer>.weight`."""
    return weight.removesuffix("_dequantized").removesuffix(".weight")


def _layer_rows(
    model: nn.Module, before: dict[str, tuple[int, int]], exported: dict[str, Any], kernels: dict[str, str]
) -> list[dict]:
    """Per layer: channels and weights before and after, how the file stores it and (quantized layers) which kernel
    ONNX Runtime runs it with in a default session."""
    rows = []
    quantized = quantized_layers(model)
    for name, now in layer_shapes(model).items():
        original = before.get(name, now)
        row = {
            **asdict(LayerShape(name, original[0], now[0], original[1], now[1])),
            "storage": "float32",
            "mean_bits": 32.0,
            "max_bits": 32.0,
        }
        if name in quantized:
            bits = quantized[name].weight_quantizer.bits.detach().float().relu()
            layer = exported[name]
            row.update(storage=layer.storage, mean_bits=round(float(bits.mean()), 3), max_bits=round(layer.max_bits, 3),
                       ort_kernel=", ".join(dict.fromkeys(kernels.get(n, "?") for n in layer.nodes)))  # fmt: skip
            if layer.reason:
                row["reason"] = layer.reason
        rows.append(row)
    return rows


def _accuracy(model: nn.Module, session, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    name = session.get_inputs()[0].name
    device = next(model.parameters()).device
    right_torch = right_onnx = total = 0
    with torch.no_grad():
        for x, y in batches:
            right_torch += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            right_onnx += int((torch.from_numpy(session.run(None, {name: x.numpy()})[0]).argmax(1) == y).sum())
            total += len(y)
    return {"pytorch": right_torch / total, "onnx": right_onnx / total, "images": total}


def _engine(onnx_path: Path, model: nn.Module, inputs: list[Tensor], options: ExportOptions, sparse: bool) -> dict:
    if options.engine == "never":
        return {"built": False, "reason": "engine=never"}
    if options.int4:
        return {"built": False, "reason": INT4_NO_ENGINE}
    if options.runtime == "onnxruntime":
        return {"built": False, "reason": ORT_LAYOUT_NO_ENGINE}
    max_batch = max([*options.latency_batches, *(len(x) for x in inputs)])  # every batch that will run through it
    try:
        path = build_engine(onnx_path, onnx_path.with_suffix(".engine"), max_batch=max_batch, sparse_weights=sparse,
                            fp16=options.fp16)  # fmt: skip
        engine = Engine(path)
    except (TensorRTUnavailable, EngineBuildError, ValueError) as error:  # ValueError: fp16 on TensorRT 11
        if options.engine == "always":
            raise
        return {"built": False, "reason": str(error)}
    errors = [float((engine(x).float().cpu() - reference_output(model, x).float().cpu()).abs().max()) for x in inputs]
    latency = engine.latency_ms(tuple(inputs[0].shape[1:]), list(options.latency_batches), runs=options.latency_runs)
    return {"built": True, "path": str(path), "bytes": path.stat().st_size, "sparse_weights": sparse,
            "max_abs_error": max(errors), "latency_ms": latency}  # fmt: skip


def export_and_report(
    model: nn.Module,
    path: str | Path,
    batches: Sequence[Tensor],
    options: ExportOptions = ExportOptions(),
    *,
    before: dict[str, tuple[int, int]] | None = None,
    parameters_before: int | None = None,
    macs_before: int | None = None,
    accuracy_batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    extra: dict[str, Any] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Export `model` to `path` (.onnx), build the engine if asked and possible, write `path` with suffix .json.
    With engine="always", a failed engine build raises after the .onnx file is written and before the report.

    `batches`: real input batches (the first is the export's example; calibration and parity use the first few).
    `before`, `parameters_before`, `macs_before`: the network before compression (default: as it is now).
    `accuracy_batches`: (images, labels); when given, top-1 accuracy of PyTorch and of the file are compared.
    """
    path, start = check_output_path(path), time.perf_counter()
    if not batches:
        raise ValueError("export_and_report needs at least one input batch.")
    example = batches[0]
    calibration = list(batches[: options.calibrate_batches]) or None
    parity_inputs = list(batches[: options.parity_batches])
    if options.calibrate_batches > len(batches):
        raise ValueError(f"calibrate_batches={options.calibrate_batches} but only {len(batches)} batches were given.")
    result = export_onnx(model, example, path, int4=options.int4, calibration=calibration,
                         parity_inputs=parity_inputs, tolerance=options.tolerance, runtime=options.runtime)  # fmt: skip
    sparse = [_layer_name(c.name) for c in check_onnx(path) if c.sparse]
    exported = {layer.name: layer for layer in result.layers}
    macs_after = macs(model, example)
    report: dict[str, Any] = {
        **result.to_dict(),
        "parameters_before": parameters_before or parameter_count(model),
        "parameters_after": parameter_count(model),
        "macs_before": macs_before or macs_after,
        "macs_after": macs_after,
        "sparse_24_layers": sparse,
        "layers": _layer_rows(model, before or {}, exported, ort_kernels(path)),
        "ort_cpu_latency_ms": ort_latency_ms(
            path, tuple(example.shape[1:]), list(options.latency_batches), runs=options.latency_runs
        ),  # fmt: skip
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(options).items()},
        **(extra or {}),
    }
    if accuracy_batches is not None:
        report["accuracy"] = _accuracy(model.eval(), onnx_session(path), accuracy_batches)
    report["engine"] = _engine(path, model, parity_inputs, options, bool(sparse))
    report["seconds"] = round(time.perf_counter() - start, 2)  # export, checks, latency, engine: all of it
    write_json(path.with_suffix(".json"), report)
    print_export_table(report, console)
    return report


def activations_note(report: dict[str, Any]) -> str:
    """What the parity of a file with int8 activations measured: for trained steps, the graph as ONNX defines its
    ops run free, the codes layer by layer, the outputs computed from them (what the tolerance holds), and the
    runtime's own arithmetic beside them."""
    parity = report["parity"]
    if parity.get("kernels_max_rel") is None:
        return " (int8 activations)" if report["activation_quantized"] else ""
    codes = ""
    if parity.get("codes_changed") is not None:
        codes = f"; {parity['codes_changed']:.2%} of a layer's codes moved at most, by up to {parity['codes_max_levels']}"
    if parity.get("forced_max_rel") is not None:
        codes += f"; computed from the file's codes {parity['forced_max_rel']:.2g}"
    kernels = f"a default session's integer kernels {parity['kernels_max_rel']:.3g}"
    return f" (int8 activations: the graph as ONNX defines its ops{codes}; {kernels})"


def print_export_table(report: dict[str, Any], console: Console | None = None) -> None:
    table = Table(title=f"Export: {report['path']}")
    for column in ("layer", "channels", "weights", "stored as", "mean bits", "2:4", "ONNX Runtime kernel"):
        table.add_column(column, justify="left" if column in ("layer", "stored as", "ONNX Runtime kernel") else "right")
    sparse = set(report["sparse_24_layers"])
    for row in report["layers"]:
        shape = LayerShape(*(row[f.name] for f in fields(LayerShape)))
        table.add_row(shape.name, *shape_cells(shape), row["storage"], f"{row['mean_bits']:.2f}",
                      "yes" if shape.name in sparse else "", row.get("ort_kernel", ""))  # fmt: skip
    console = console or make_console()
    console.print(table)
    parity = report["parity"]
    lines = [
        f"ONNX file {report['file_bytes']:,} bytes vs {report['float_file_bytes']:,} with float32 weights "
        f"({report['file_bytes'] / report['float_file_bytes']:.1%}); parameters {report['parameters_after']:,}/"
        f"{report['parameters_before']:,}"
        + (
            f"; the network as built, float32: {report['original_float_file_bytes']:,} bytes"
            if "original_float_file_bytes" in report
            else ""
        )
        + (f"; MACs per sample {report['macs_after']:,}/{report['macs_before']:,}" if report["macs_after"] else ""),
        f"Parity with PyTorch (ONNX Runtime, CPU): max abs {parity['max_abs']:.3g}, relative {parity['max_rel']:.3g}"
        + activations_note(report),
        "ONNX Runtime CPU latency, median: "
        + ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in report["ort_cpu_latency_ms"].items()),
    ]
    if "accuracy" in report:
        acc = report["accuracy"]
        lines.append(f"Top-1 on {acc['images']:,} images: PyTorch {acc['pytorch']:.2%}, ONNX {acc['onnx']:.2%}")
    engine = report["engine"]
    lines.append(
        f"TensorRT engine: {engine['path']}, latency "
        + ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in engine["latency_ms"].items())
        if engine["built"]
        else f"TensorRT engine not built: {engine['reason']}"
    )
    console.print("\n".join(lines), markup=False, highlight=False)
