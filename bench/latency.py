"""Inference latency of the float network vs its exported compressed version, side by side with the MACs ratio.

`python bench/latency.py [--run RUN_DIR_OR_CKPT] [--batches 1 64] [--quick]`

For each model, three ONNX files are timed in ONNX Runtime on CPU, alternating rounds (best of the rounds' medians),
in the same process: the network as built (float32, every channel), the thinned network with float32 weights, and
the exported file (int8 weights behind DequantizeLinear). Models: with `--run`, an lsc-train run (the float network
rebuilt from its config, the compressed one with `load_compressed`); always, two synthetic cases where half of the
removable channel groups are dead (bit depth 0, constant 0) and cut, as a trained network leaves them, at widths as
found (round_to=1) and kept multiples of 16 (round_to=16). "latency fall / MACs fall" is (1 - t_c / t_f) /
(1 - MACs_c / MACs_f): 1.0 means latency falls exactly as much as the multiply-accumulates do.

On a CUDA machine it also times PyTorch eager and torch.compile (float vs thinned, dequantized weights) with CUDA
events and, where TensorRT is installed, the engine built from each file.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from lightning_selfcompress.core.export import export_onnx, inference_form
from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.latency import ort_latency_side_by_side
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.surgery import Surgeon
from lightning_selfcompress.core.tensorrt import Engine, EngineBuildError, TensorRTUnavailable, build_engine
from lightning_selfcompress.models import BaselineCNN, ResNet9
from lightning_selfcompress.testing import choose_groups, kill_groups

GOAL = 0.7  # latency should fall at least 70% as much as the MACs


def synthetic(make, shape: tuple[int, ...], round_to: int, seed: int = 0) -> tuple[nn.Module, nn.Module, Tensor]:
    """(float network, the same with half its removable channel groups dead and cut, example input)."""
    torch.manual_seed(seed)
    x = torch.randn(2, *shape)
    float_net = make().eval()
    net = make().eval()
    net.load_state_dict(float_net.state_dict())
    attach_quantizers(net)
    graph = ChannelGraph(net, x[:1])
    kill_groups(graph, choose_groups(graph, 0.5, seed=seed))
    surgeon = Surgeon(graph, round_to=round_to)
    surgeon.remove(surgeon.find())
    return float_net, net.eval(), x


def from_run(path: str) -> tuple[nn.Module, nn.Module, Tensor]:
    from deploy import load_run  # bench/ is on the path when this runs as a script

    float_net, compressed, datamodule = load_run(path)
    x, _ = next(iter(datamodule.test_dataloader()))
    return float_net, compressed, x[:2]


def macs(model: nn.Module, x: Tensor) -> int:
    return ChannelGraph(model, x[:1]).macs()


def onnx_files(scratch: Path, name: str) -> dict[str, Path]:
    """The three files of a model: written by `ort_table`, read again by `gpu_table`."""
    return {key: scratch / f"{name}.{key}.onnx" for key in ("float", "thinned", "exported")}


def ort_table(cases: dict, batches: list[int], runs: int, rounds: int, threads: int | None, scratch: Path) -> Table:
    table = Table(title=f"ONNX Runtime CPU, median ms per batch (best of {rounds} rounds of {runs})")
    for column in ("model", "batch", "float, as built", "thinned, float32", "exported (int8 weights)", "speed-up",
                   "MACs ratio", "latency fall / MACs fall"):  # fmt: skip
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, (float_net, compressed, x) in cases.items():
        files = onnx_files(scratch, name)
        export_onnx(float_net, x, files["float"])
        export_onnx(compressed, x, files["exported"], float_path=files["thinned"])
        best = ort_latency_side_by_side(files, batches, tuple(x.shape[1:]), runs, rounds, warmup=3, threads=threads)
        m_float, m_comp = macs(float_net, x), macs(compressed, x)
        for b in batches:
            f, t, e = best["float"][b], best["thinned"][b], best["exported"][b]
            fall = (1 - e / f) / (1 - m_comp / m_float) if m_comp < m_float else float("nan")
            table.add_row(name, str(b), f"{f:.3f}", f"{t:.3f}", f"{e:.3f}", f"{f / e:.2f}x", f"{m_float / m_comp:.2f}x",
                          f"{fall:.2f}")  # fmt: skip
    return table


def cuda_ms(fn, x: Tensor, runs: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def gpu_table(cases: dict, batches: list[int], runs: int, scratch: Path) -> Table:
    have_tensorrt = True
    table = Table(title=f"CUDA, median ms per batch ({runs} runs, CUDA events)")
    for column in ("model", "batch", "runner", "float", "compressed", "speed-up", "MACs ratio"):
        table.add_column(column, justify="left" if column in ("model", "runner") else "right")
    for name, (float_net, compressed, x) in cases.items():
        ratio = macs(float_net, x) / macs(compressed, x)
        with inference_form(compressed):
            sides = {"float": float_net.cuda(), "compressed": compressed.cuda()}
            runners = {"eager": dict(sides), "compiled": {k: torch.compile(m) for k, m in sides.items()}}
            for runner, models in runners.items():
                for b in batches:
                    xb = torch.randn(b, *x.shape[1:], device="cuda")
                    f, c = (cuda_ms(models[k], xb, runs) for k in ("float", "compressed"))
                    table.add_row(name, str(b), runner, f"{f:.3f}", f"{c:.3f}", f"{f / c:.2f}x", f"{ratio:.2f}x")
        float_net.cpu(), compressed.cpu()
        if not have_tensorrt:
            continue
        files = onnx_files(scratch, name)
        try:
            engines = {k: Engine(build_engine(files[f], scratch / f"{name}.{k}.engine", max_batch=max(batches)))
                       for k, f in (("float", "float"), ("compressed", "exported"))}  # fmt: skip
        except TensorRTUnavailable as error:
            print(f"TensorRT skipped: {error}", file=sys.stderr)
            have_tensorrt = False
            continue
        except EngineBuildError as error:
            print(f"TensorRT engine for {name} not built: {error}", file=sys.stderr)
            continue
        latency = {k: e.latency_ms(tuple(x.shape[1:]), batches, runs=runs) for k, e in engines.items()}
        for b in batches:
            f, c = latency["float"][b], latency["compressed"][b]
            table.add_row(name, str(b), "TensorRT", f"{f:.3f}", f"{c:.3f}", f"{f / c:.2f}x", f"{ratio:.2f}x")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="an lsc-train run directory or checkpoint to compare with its float network")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="few runs and rounds (a smoke run)")
    args = parser.parse_args()
    runs, rounds = (5, 1) if args.quick else (50, 3)
    console = Console(width=200)
    console.print(f"load average before: {os.getloadavg()}, {os.cpu_count()} cores, torch {torch.__version__}")
    cases = {}
    if args.run:
        cases["lsc-train run"] = from_run(args.run)
    for round_to in (1, 16):
        cases[f"baseline CNN, round_to={round_to}"] = synthetic(lambda: BaselineCNN(1, 10), (1, 28, 28), round_to)
        cases[f"ResNet-9 w16, round_to={round_to}"] = synthetic(lambda: ResNet9(1, 10, width=16), (1, 28, 28), round_to)
    with tempfile.TemporaryDirectory() as scratch:
        console.print(ort_table(cases, args.batches, runs, rounds, args.threads, Path(scratch)))
        if torch.cuda.is_available():
            console.print(gpu_table(cases, args.batches, runs, Path(scratch)))
    console.print(f"load average after: {os.getloadavg()}; goal: latency falls at least {GOAL:.0%} as much as MACs")


if __name__ == "__main__":
    main()
