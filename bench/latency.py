"""Inference latency of the float network vs its exported compressed version, side by side with the MACs ratio.

`python bench/latency.py [--run RUN_DIR_OR_CKPT] [--batches 1 64] [--torchvision NAME ...] [--runtime cuda] [--quick]`

For each model, three ONNX files are timed in ONNX Runtime on CPU, alternating rounds (best of the rounds' medians),
in the same process: the network as built (float32, every channel), the thinned network with float32 weights, and
the exported file (int8 weights behind DequantizeLinear). Models: with `--run`, an lsc-train run (the float network
rebuilt from its config, the compressed one with `load_compressed`); always, two synthetic cases where half of the
removable channel groups are dead (bit depth 0, constant 0) and cut, as a trained network leaves them, at widths as
found (round_to=1) and kept multiples of 16 (round_to=16), and any torchvision classifier named (`--torchvision
resnet50`, round_to=16). "latency fall / MACs fall" is (1 - t_c / t_f) /
(1 - MACs_c / MACs_f): 1.0 means latency falls exactly as much as the multiply-accumulates do.

On a CUDA machine it also times PyTorch eager, torch.compile and torch.compile with CUDA graphs, in float32 and
under bf16 autocast (float vs thinned, dequantized weights) with CUDA events and, where TensorRT is installed, the
engine built from each file; `--runtime cuda` times only those (a GPU machine's CPU is not the deployment target).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from functools import partial
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
    return float_net, cut_dead(net, x, 0.5, round_to, seed), x


def cut_dead(net: nn.Module, x: Tensor, fraction: float, round_to: int = 1, seed: int = 0) -> nn.Module:
    """`net`, quantized in place, with a random `fraction` of its removable channel groups dead (0 bits, constant 0)
    and cut, as a trained network leaves them (at 1.0, one channel left per layer)."""
    attach_quantizers(net)
    graph = ChannelGraph(net, x[:1])
    kill_groups(graph, choose_groups(graph, fraction, seed=seed))
    surgeon = Surgeon(graph, round_to=round_to)
    surgeon.remove(surgeon.find())
    return net.eval()


def from_run(path: str) -> tuple[nn.Module, nn.Module, Tensor]:
    from deploy import load_run  # bench/ is on the path when this runs as a script

    float_net, compressed, datamodule = load_run(path)
    x, _ = next(iter(datamodule.test_dataloader()))
    return float_net, compressed, x[:2]


def macs(model: nn.Module, x: Tensor) -> int:
    return ChannelGraph(model, x[:1]).macs()


def onnx_files(scratch: Path, name: str, float_net: nn.Module, compressed: nn.Module, x: Tensor) -> dict[str, Path]:
    """The three files of a model, written once: timed by `ort_table`, built into engines by `tensorrt_rows`."""
    files = {key: scratch / f"{name}.{key}.onnx" for key in ("float", "thinned", "exported")}
    if not files["exported"].exists():
        export_onnx(float_net, x, files["float"])
        export_onnx(compressed, x, files["exported"], float_path=files["thinned"])
    return files


def ort_table(cases: dict, batches: list[int], runs: int, rounds: int, threads: int | None, scratch: Path) -> Table:
    table = Table(title=f"ONNX Runtime CPU, median ms per batch (best of {rounds} rounds of {runs})")
    for column in ("model", "batch", "float, as built", "thinned, float32", "exported (int8 weights)", "speed-up",
                   "MACs ratio", "latency fall / MACs fall"):  # fmt: skip
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, (float_net, compressed, x) in cases.items():
        files = onnx_files(scratch, name, float_net, compressed, x)
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


# How a user runs a network in PyTorch on a GPU. "CUDA graphs" replays each batch's kernels as one graph: on an H200
# the Fashion-MNIST networks are bound by kernel launches at any width (docs/pages/benchmarks.md), which it removes.
RUNNERS = {"eager": lambda model: model, "compiled": torch.compile,
           "CUDA graphs": partial(torch.compile, mode="reduce-overhead")}  # fmt: skip


@torch.no_grad()
def cuda_rows(float_net: nn.Module, compressed: nn.Module, x: Tensor, batches: list[int], runs: int,
              dtypes: tuple[torch.dtype, ...] = (torch.float32,), rounds: int = 3) -> list[dict]:
    """PyTorch on CUDA, float network against the compressed one (its dequantized weights), per runner (`RUNNERS`),
    autocast dtype and batch: the best of `rounds` medians of `runs`, CUDA events, the two networks taking
    turns (a single round moved by up to 40% between invocations on an H200). float32 convolutions run in TF32 where
    PyTorch's defaults allow (cuDNN's), as a user's do. Both networks share their forward's code, whose compilations
    (per network, dtype, batch) pass Dynamo's default limit of 8, past which it runs the rest eager: it is raised."""
    rows = []
    torch._dynamo.reset()
    with inference_form(compressed), torch._dynamo.config.patch(recompile_limit=64):
        sides = {"float": float_net.cuda().eval(), "compressed": compressed.cuda().eval()}
        for runner, wrap in RUNNERS.items():
            models = {k: wrap(m) for k, m in sides.items()}
            for dtype in dtypes:
                for b in batches:
                    xb = torch.randn(b, *x.shape[1:], device="cuda")
                    best = {"float": math.inf, "compressed": math.inf}
                    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                        for _ in range(rounds):
                            for k, ms in best.items():
                                best[k] = min(ms, cuda_ms(models[k], xb, runs))
                    f, c = best["float"], best["compressed"]
                    rows.append({"runner": runner, "dtype": str(dtype).removeprefix("torch."), "batch": b,
                                 "float ms": round(f, 4), "compressed ms": round(c, 4), "speed-up": round(f / c, 2)})
    float_net.cpu(), compressed.cpu()
    return rows


def tensorrt_rows(name: str, case: tuple, batches: list[int], runs: int, scratch: Path) -> list[dict]:
    """The engines built from the float file and the exported one, timed; raises TensorRTUnavailable without it."""
    files, shape = onnx_files(scratch, name, *case), tuple(case[2].shape[1:])
    engines = {k: Engine(build_engine(files[f], scratch / f"{name}.{k}.engine", max_batch=max(batches)))
               for k, f in (("float", "float"), ("compressed", "exported"))}  # fmt: skip
    latency = {k: e.latency_ms(shape, batches, runs=runs) for k, e in engines.items()}
    return [{"runner": "TensorRT", "dtype": "file's", "batch": b, "float ms": latency["float"][b],
             "compressed ms": latency["compressed"][b], "speed-up": latency["float"][b] / latency["compressed"][b]}
            for b in batches]  # fmt: skip


def gpu_tables(cases: dict, batches: list[int], runs: int, scratch: Path, console: Console) -> None:
    """One table per model, printed as soon as it is measured (a GPU's time is short: a cut-off run keeps its rows)."""
    have_tensorrt = True
    for name, case in cases.items():
        float_net, compressed, x = case
        ratio = macs(float_net, x) / macs(compressed, x)
        rows = cuda_rows(float_net, compressed, x, batches, runs, (torch.float32, torch.bfloat16))
        if have_tensorrt:
            try:
                rows += tensorrt_rows(name, case, batches, runs, scratch)
            except TensorRTUnavailable as error:
                print(f"TensorRT skipped: {error}", file=sys.stderr)
                have_tensorrt = False
            except EngineBuildError as error:
                print(f"TensorRT engine for {name} not built: {error}", file=sys.stderr)
        table = Table(title=f"{name} on CUDA, median ms per batch ({runs} runs, CUDA events); MACs ratio {ratio:.2f}x")
        for column in rows[0]:
            table.add_column(column, justify="left" if column in ("runner", "dtype") else "right")
        for row in rows:
            table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
        console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="an lsc-train run directory or checkpoint to compare with its float network")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="few runs and rounds (a smoke run)")
    parser.add_argument("--synthetic", nargs="*", choices=["baseline", "resnet9"], default=["baseline", "resnet9"],
                        help="which synthetic cases to time (none: leave the list empty)")
    parser.add_argument("--torchvision", nargs="*", default=[], metavar="NAME",
                        help="torchvision classifiers to add, half their removable channel groups cut (round_to=16)")
    parser.add_argument("--size", type=int, default=224, help="the torchvision models' input height and width")
    parser.add_argument("--runtime", choices=["all", "onnxruntime", "cuda"], default="all",
                        help="time only ONNX Runtime CPU, or only CUDA (on a GPU machine, whose CPU is not the target)")
    args = parser.parse_args()
    if args.runtime == "cuda" and not torch.cuda.is_available():
        parser.error("--runtime cuda: torch sees no CUDA GPU")
    runs, rounds = (5, 1) if args.quick else (50, 3)
    console = Console(width=200)
    console.print(f"load average before: {os.getloadavg()}, {os.cpu_count()} cores, torch {torch.__version__}")
    cases = {}
    if args.run:
        cases["lsc-train run"] = from_run(args.run)
    for round_to in (1, 16):
        if "baseline" in args.synthetic:
            cases[f"baseline CNN, round_to={round_to}"] = synthetic(lambda: BaselineCNN(1, 10), (1, 28, 28), round_to)
        if "resnet9" in args.synthetic:
            make = partial(ResNet9, 1, 10, width=16)
            cases[f"ResNet-9 w16, round_to={round_to}"] = synthetic(make, (1, 28, 28), round_to)
    for name in args.torchvision:
        import torchvision  # only for these cases, as bench/deploy.py does: the other cases and gpu_check need none

        make = partial(torchvision.models.get_model, name)
        cases[f"{name} {args.size}x{args.size}, round_to=16"] = synthetic(make, (3, args.size, args.size), 16)
    with tempfile.TemporaryDirectory() as scratch:
        if args.runtime != "cuda":
            console.print(ort_table(cases, args.batches, runs, rounds, args.threads, Path(scratch)))
        if args.runtime != "onnxruntime" and torch.cuda.is_available():
            gpu_tables(cases, args.batches, runs, Path(scratch), console)
    console.print(f"load average after: {os.getloadavg()}; goal: latency falls at least {GOAL:.0%} as much as MACs")


if __name__ == "__main__":
    main()
