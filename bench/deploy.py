"""Deployed speed: our exported files against what a user would ship instead, in a default ONNX Runtime session.

`python bench/deploy.py --run RUN_DIR [RUN_DIR ...] [--float-run FLOAT_RUN_DIR] [--batches 1 64] [--quick] [--profile]`
`python bench/deploy.py --model resnet50 [--size 224] [--runs 10 --rounds 3]`

Four files of the same network, and the first again, timed side by side in one process on CPU (ONNX Runtime's
default session options, random inputs, alternating rounds, the best of the rounds' medians):

1. float: the float network as built, `torch.onnx.export` in eval mode (the legacy exporter, which folds a Conv's
   BatchNorm into its weight), what a user exports without us;
2. ORT int8: that file quantized by ONNX Runtime's own `quantize_static` (after `quant_pre_process`; QDQ format,
   per-channel int8 weights, int8 activations calibrated on the same training images as ours);
3. ours, weights: the run's compressed network, `export_onnx` (int8 weights folded at load, BatchNorm folded);
4. ours, int8: the same with int8 activations calibrated on those images (Q/DQ where ONNX Runtime fuses them),
   in the layout TensorRT takes (symmetric) and in the one ONNX Runtime runs fastest (`runtime="onnxruntime"`: a
   uint8, a ReLU's output over the whole range, fused into the integer kernel; the first layer on the image float);
   for a run trained with int8 activations (`compression.int8_activations=true`) its trained steps instead, in both
   layouts (in ONNX Runtime's alone where they trained for it, `compression.activation_runtime=onnxruntime`);
5. with a weight-only file among them: the float network at one channel per layer (every removable channel group
   dead and cut), weight-only: what no channel count removes (each node's fixed cost), so the most any thinning of
   this graph can gain on this runtime;
6. the float export again, timed last in every round: its speed-up over itself is this invocation's noise (two
   timings of one file moved up to 30% apart at batch 1 on a 2-core host, 2026-12-04): a difference between files
   smaller than its distance from 1.00x is not one.

With `--narrow-run`, trained float runs of a narrower network of the same family (`model.width=8`, say), the other
thing a user wanting speed would do instead: each one's plain export and its `quantize_static` file, timed in the same
rounds, with their test accuracies.

The float network is the run's, rebuilt from its config (untrained: speed does not depend on the values), or the
trained float run given with `--float-run`, in which case its test accuracy and that of its `quantize_static` file
are measured too. With `--model`, a torchvision classifier (untrained) stands in for a run, as a trained network
would leave it: half of its removable channel groups dead (0 bits, constant 0) and cut to multiples of 16; both
sides calibrate on the same random images (no data here, so no accuracy). Each row says how many of the file's
convolutions ONNX Runtime runs as integer kernels (read from its optimized graph). Last, how much of the fall in
multiply-accumulates the weight-only file's latency shows (both files float32 at inference: the thinning alone),
and with `--profile` where: each node's time in the float file and the weight-only one (ONNX Runtime's profiler).

Several runs of the same network (`--run A B C`, say two versions of the code) are timed in the same rounds, each
file of each run beside the others and the float export: timings from separate invocations wander by more than the
differences between runs (the float export's own latency moved 10.4-13.1 ms at batch 64 between invocations here).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_selfcompress.core.export import export_onnx, uint8_steps
from lightning_selfcompress.core.latency import INTEGER_KERNELS, ort_kernels, ort_latency_side_by_side, ort_node_ms
from lightning_selfcompress.core.parity import onnx_session
from lightning_selfcompress.core.quant import input_steps

FLOOR = "one channel per layer, weights"


def load_run(path: str) -> tuple[nn.Module, nn.Module, object]:
    """(the float network as built, the run's trained network, its datamodule)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lightning_selfcompress.core.surgery import load_compressed
    from lightning_selfcompress.export_cli import find_checkpoint, find_run_config
    from lightning_selfcompress.models import ImageClassifier

    checkpoint = find_checkpoint(path)
    cfg = OmegaConf.load(find_run_config(checkpoint, None))
    float_net = ImageClassifier(instantiate(cfg.model), **cfg.optim).eval()
    trained = load_compressed(ImageClassifier(instantiate(cfg.model), **cfg.optim), checkpoint).eval()
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    datamodule.setup("test")
    return float_net, trained, datamodule


def load_torchvision(name: str, size: int, batches: int) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    """(the float network, the same with half its removable channel groups dead and cut, calibration batches)."""
    import torchvision
    from latency import synthetic  # bench/ is on the path when this runs as a script

    float_net, ours, _ = synthetic(lambda: torchvision.models.get_model(name), (3, size, size), round_to=16)
    generator = torch.Generator().manual_seed(1)
    return float_net, ours, [torch.randn(8, 3, size, size, generator=generator) for _ in range(batches)]


def multiply_accumulates(net: nn.Module, x: torch.Tensor) -> int:
    """Per sample, as the network runs (a cut branch's re-embedding included), counted by torch's own FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.eval()(x[:1])
    return counter.get_total_flops() // 2


def narrowest(float_net: nn.Module, x: torch.Tensor) -> nn.Module:
    """The float network with every removable channel group dead and cut (one channel left per layer): the file
    that bounds what any thinning of this graph can gain on this runtime."""
    from latency import cut_dead  # bench/ is on the path when this runs as a script

    return cut_dead(copy.deepcopy(float_net).eval(), x, 1.0)


def plain_export(net: nn.Module, x: torch.Tensor, path: Path) -> None:
    torch.onnx.export(net.eval(), (x,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})  # fmt: skip


def ort_quantize_static(source: Path, path: Path, calibration: list[torch.Tensor]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x.numpy()} for x in calibration])

        def get_next(self):
            return next(self.batches, None)

    prepared = path.with_suffix(".pre.onnx")
    quant_pre_process(str(source), str(prepared))
    quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)


def accuracy(path: Path, batches) -> float:
    session = onnx_session(path)
    right = total = 0
    for x, y in batches:
        right += int((session.run(None, {"input": x.numpy()})[0].argmax(1) == y.numpy()).sum())
        total += len(y)
    return right / total


def integer_share(path: Path) -> str:
    kernels = ort_kernels(path)
    return f"{sum(k in INTEGER_KERNELS for k in kernels.values())}/{len(kernels)}"


def node_table(label: str, float_file: Path, weights_file: Path, x: torch.Tensor, batch: int, runs: int) -> Table:
    """The float file's nodes and the weight-only file's side by side (matched by name: both exported from the same
    modules), median ms per call: which layers' time fell less than their multiply-accumulates."""
    shape = tuple(x.shape[1:])
    before, after = ort_node_ms(float_file, shape, batch, runs), ort_node_ms(weights_file, shape, batch, runs)
    table = Table(title=f"{label}: where the time goes, batch {batch} (ONNX Runtime's profiler, median ms per call)")
    for column in ("node", "op", "float ms", "weight-only ms", "fall"):
        table.add_column(column, justify="left" if column in ("node", "op") else "right")
    for name in [*before, *(n for n in after if n not in before)]:
        f, c = (nodes[name][1] if name in nodes else None for nodes in (before, after))
        fall = f"{1 - c / f:.0%}" if f and c is not None else ""
        table.add_row(name, (before.get(name) or after[name])[0], *("" if v is None else f"{v:.3f}" for v in (f, c)),
                      fall)
    total_before, total_after = (sum(ms for _, ms in nodes.values()) for nodes in (before, after))
    table.add_row("all nodes", "", f"{total_before:.3f}", f"{total_after:.3f}", f"{1 - total_after / total_before:.0%}")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", nargs="+", help="lsc-train run directories or checkpoints (compressed models of "
                        "one network), timed side by side")
    source.add_argument("--model", help="a torchvision classifier, half its channel groups dead and cut (synthetic)")
    parser.add_argument("--float-run", help="a trained float lsc-train run of the same network (for accuracies)")
    parser.add_argument("--narrow-run", nargs="+", default=[], help="trained float lsc-train runs of narrower "
                        "networks, timed beside (their plain export and quantize_static)")
    parser.add_argument("--size", type=int, default=224, help="with --model: the input images' height and width")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--runs", type=int, default=100, help="timed calls per file, batch size and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="few runs and rounds, no accuracy (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="where the time goes: each node of the float file and "
                        "of each weight-only file, at the largest batch (ONNX Runtime's profiler)")
    args = parser.parse_args()
    if (args.float_run or args.narrow_run) and not args.run:
        parser.error("--float-run and --narrow-run go with --run: a torchvision model has no trained runs here")
    runs, rounds = (5, 1) if args.quick else (args.runs, args.rounds)
    console = Console(width=200)
    console.print(f"load average before: {os.getloadavg()}, {os.cpu_count()} cores, torch {torch.__version__}")

    datamodule = None
    if args.model:
        float_net, net, calibration = load_torchvision(args.model, args.size, args.calibration_batches)
        ours = {"ours": net}
    else:
        loaded = {run: load_run(run) for run in args.run}
        float_net, _, datamodule = loaded[args.run[0]]
        if args.float_run:
            float_net = load_run(args.float_run)[1]
        ours = {"ours" if len(args.run) == 1 else f"ours {run}": net for run, (_, net, _) in loaded.items()}
        train = iter(datamodule.train_dataloader())
        calibration = [next(train)[0] for _ in range(args.calibration_batches)]
    x = calibration[0][:2]
    layouts = {"int8 (TensorRT layout)": "tensorrt", "int8 (ONNX Runtime layout)": "onnxruntime"}
    mine: dict[str, tuple[nn.Module, str, list | None]] = {}  # file -> (network, layout, calibration)
    for label, net in ours.items():
        has_steps = bool(input_steps(net))
        if not has_steps:
            mine[f"{label}, weights"] = net, "tensorrt", None
        steps, named = (None, ", trained steps") if has_steps else (calibration, "")  # trained steps: no calibration
        fitting = {k: r for k, r in layouts.items() if r == "onnxruntime" or not uint8_steps(net)}  # uint8: ORT only
        mine.update({f"{label}, {key}{named}": (net, runtime, steps) for key, runtime in fitting.items()})
    with tempfile.TemporaryDirectory() as scratch:
        narrow = [f"{kind}, {run}" for run in args.narrow_run for kind in ("narrow float", "narrow ORT int8")]
        floor = FLOOR if any(key.endswith(", weights") for key in mine) else None
        keys = ("float", "ORT int8", *narrow, *mine, *([floor] if floor else []))
        files = {key: Path(scratch) / f"{i}.onnx" for i, key in enumerate(keys)}
        plain_export(float_net, x, files["float"])
        ort_quantize_static(files["float"], files["ORT int8"], calibration)
        for run in args.narrow_run:
            plain_export(load_run(run)[1], x, files[f"narrow float, {run}"])
            ort_quantize_static(files[f"narrow float, {run}"], files[f"narrow ORT int8, {run}"], calibration)
        for key, (net, runtime, steps_from) in mine.items():
            export_onnx(net, x, files[key], calibration=steps_from, tolerance=None, runtime=runtime)
        if floor:
            floor_net = narrowest(float_net, x)
            export_onnx(floor_net, x, files[floor], tolerance=None)
        files["float, timed again"] = files["float"]
        best = ort_latency_side_by_side(files, args.batches, tuple(x.shape[1:]), runs=runs, rounds=rounds)
        trained = set(mine) | set(narrow) | ({"float", "ORT int8"} if args.float_run else set())
        test = None if args.quick or datamodule is None else list(datamodule.test_dataloader())
        title = f"ONNX Runtime CPU, default session, median ms per batch (best of {rounds} rounds of {runs})"
        table = Table(title=title)
        timed = [f"batch {b}" for b in args.batches] + [f"speed-up, batch {b}" for b in args.batches]
        for column in ("file", "bytes", "integer kernels", "test accuracy", *timed):
            table.add_column(column, justify="left" if column == "file" else "right")
        for key, path in files.items():
            acc = f"{accuracy(path, test):.2%}" if test is not None and key in trained else ""
            table.add_row(key, f"{path.stat().st_size:,}", integer_share(path), acc,
                          *(f"{best[key][b]:.3f}" for b in args.batches),
                          *(f"{best['float'][b] / best[key][b]:.2f}x" for b in args.batches))  # fmt: skip
        console.print(table)
        for label, net in ours.items():  # the thinning alone: float32 weights on both sides, at inference
            if f"{label}, weights" in files:
                fewer = 1 - multiply_accumulates(net, x) / multiply_accumulates(float_net, x)
                for b in args.batches:
                    faster = 1 - best[f"{label}, weights"][b] / best["float"][b]
                    console.print(f"{label}, batch {b}: the thinning removed {fewer:.1%} of the multiply-accumulates; "
                                  f"the weight-only file's latency fell {faster:.1%}, {faster / fewer:.0%} as much")
                if args.profile:
                    console.print(node_table(label, files["float"], files[f"{label}, weights"], x, max(args.batches),
                                             runs))  # fmt: skip
        if floor:  # what no channel count removes, so what any thinning can gain
            fewest = 1 - multiply_accumulates(floor_net, x) / multiply_accumulates(float_net, x)
            for b in args.batches:
                fell = 1 - best[floor][b] / best["float"][b]
                console.print(f"{floor}, batch {b}: {fewest:.1%} of the multiply-accumulates removed, the latency fell "
                              f"{fell:.1%}: with a fixed part and one in proportion to the multiply-accumulates, a "
                              f"thinning's latency falls at most {fell / fewest:.0%} as much as they do here")
        for key in mine:
            console.print(f"{key}, kernel per layer: {ort_kernels(files[key])}")
    console.print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
