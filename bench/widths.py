"""Which widths pay on this CPU: a network cut to widths you name, timed against its float export, in a default
ONNX Runtime session, with no training (speed does not depend on the values).

`python bench/widths.py --widths 8,24,16,24,48,112,56,112 --widths 8,24,19,24,48,112,59,112 [--model resnet9
 --set width=16] [--input 1 28 28] [--rounds 3]`

Each `--widths` gives one output width per prunable layer, in the order the model runs them (the script prints the
names). Channels past each width are made dead (0 bits, their shifts 0) and the surgeon cuts them, as a trained run
would; a residual branch's own outputs are cut from that branch. Two files per case, timed side by side with the
float network's plain `torch.onnx.export`, alternating rounds, the best of the rounds' medians: the weight-only file
(`export_onnx`) and the int8 file for ONNX Runtime (`runtime="onnxruntime"`, calibrated on random inputs). MACs are
counted as the PyTorch network runs them.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from deploy import multiply_accumulates, plain_export  # bench/ is on the path when this runs as a script
from rich.console import Console
from rich.table import Table

from lightning_selfcompress.core.export import export_onnx
from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.latency import ort_latency_side_by_side
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.surgery import Surgeon
from lightning_selfcompress.testing import kill_branch_channels, kill_groups


def build(config):
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(config).eval()


def prunable(graph: ChannelGraph) -> list[str]:
    """The layers whose output channels can go, in the order they run."""
    return [name for name, groups in graph.outputs.items() if not bool(graph.pinned_mask[groups].all())]


def cut_to(net: torch.nn.Module, x: torch.Tensor, widths: list[int]) -> torch.nn.Module:
    """`net`, quantized, with each prunable layer's channels past its width dead and cut."""
    attach_quantizers(net)
    graph = ChannelGraph(net, x[:1])
    names = prunable(graph)
    if len(widths) != len(names):
        raise SystemExit(f"--widths has {len(widths)} numbers; this model has {len(names)} prunable layers: {names}")
    dead, branches = torch.zeros(graph.num_groups, dtype=torch.bool), {}
    for name, width in zip(names, widths):
        if not 1 <= width <= len(graph.outputs[name]):
            raise SystemExit(f"--widths: {name} has {len(graph.outputs[name])} channels; {width} is not a width of it")
        past = torch.arange(len(graph.outputs[name])) >= width
        if name in graph.branches:
            branches[name] = past
        else:
            dead[graph.outputs[name][past]] = True
    kill_groups(graph, dead)
    kill_branch_channels(graph, branches)
    surgeon = Surgeon(graph)
    surgeon.remove(surgeon.find())
    return net.eval()


def main() -> None:
    from omegaconf import OmegaConf

    from lightning_selfcompress.train import CONFIG_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", action="append", required=True, help="comma-separated, one per prunable layer")
    parser.add_argument("--model", default="resnet9", help="a config in conf/model (default: resnet9)")
    parser.add_argument("--set", nargs="*", default=["width=16"], metavar="KEY=VALUE", help="model config overrides")
    parser.add_argument("--input", type=int, nargs="+", default=[1, 28, 28], help="one sample's shape (C H W)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = OmegaConf.merge(OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{args.model}.yaml"),
                             OmegaConf.from_dotlist(args.set))  # fmt: skip
    x = torch.randn(2, *args.input)
    float_net = build(config)
    console = Console(width=200)
    console.print("prunable layers, in order:", prunable(ChannelGraph(build(config), x[:1])))
    calibration = [torch.randn(64, *args.input) for _ in range(2)]
    with tempfile.TemporaryDirectory() as scratch:
        files, macs = {"float": Path(scratch) / "float.onnx"}, {}
        plain_export(float_net, x, files["float"])
        for case in args.widths:
            net = cut_to(build(config), x, [int(w) for w in case.split(",")])
            macs[case] = multiply_accumulates(net, x) / multiply_accumulates(float_net, x)
            files[(case, "weights")] = Path(scratch) / f"{len(files)}.onnx"
            export_onnx(net, x, files[(case, "weights")], tolerance=None)
            files[(case, "int8")] = Path(scratch) / f"{len(files)}.onnx"
            export_onnx(net, x, files[(case, "int8")], calibration=calibration, tolerance=None, runtime="onnxruntime")
        best = ort_latency_side_by_side(files, args.batches, tuple(args.input), runs=50, rounds=args.rounds)
    table = Table(title=f"ONNX Runtime CPU, default session: speed-up over the float export (best of {args.rounds})")
    for column in ("widths", "MACs", "file", *(f"batch {b}" for b in args.batches), "latency fall / MACs fall"):
        table.add_column(column, justify="left" if column in ("widths", "file") else "right")
    for case, kind in (key for key in files if key != "float"):
        speedups = [best["float"][b] / best[(case, kind)][b] for b in args.batches]
        falls = [(1 - 1 / s) / (1 - macs[case]) for s in speedups] if kind == "weights" and macs[case] < 1 else []
        table.add_row(case, f"{macs[case]:.1%}", kind, *(f"{s:.2f}x" for s in speedups),
                      " / ".join(f"{f:.0%}" for f in falls))  # fmt: skip
    console.print(table)
    console.print("float export, ms per batch:", {b: round(ms, 3) for b, ms in best["float"].items()})


if __name__ == "__main__":
    main()
