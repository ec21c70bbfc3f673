"""Channel surgery on a CUDA GPU: training steps before and after a cut (eager and torch.compile), side by side
with the multiply-accumulate ratio, and torch.compile's behaviour across a surgery.

`python bench/gpu_surgery.py [--quick]`; needs CUDA. Models are torchvision ResNets on 32x32 inputs (CIFAR-sized),
quantized, with 50% of their removable channel groups killed and cut; bf16 autocast, Adam.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
import torchvision
from rich.console import Console
from rich.table import Table

from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.surgery import Surgeon
from lightning_selfcompress.testing import choose_groups, kill_groups


SIZE = 32  # input height and width; --size changes it


def make(name: str, round_to: int = 1) -> tuple[torch.nn.Module, Surgeon]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).cuda()
    attach_quantizers(model)
    surgeon = Surgeon(ChannelGraph(model, torch.randn(2, 3, SIZE, SIZE, device="cuda")), round_to=round_to)
    return model, surgeon


def step_ms(model, optimizer, x, y, steps: int) -> float:
    """Median milliseconds of a training step, timed with CUDA events."""
    times = []
    for i in range(steps + 5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def speed(name: str, batch: int, steps: int, compiled: bool, round_to: int) -> tuple[float, float, float]:
    """(ms before, ms after, MACs before / after): the cut model keeps its optimizer and goes on training."""
    x = torch.randn(batch, 3, SIZE, SIZE, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    whole, _ = make(name)
    cut, surgeon = make(name, round_to)
    kill_groups(surgeon.graph, choose_groups(surgeon.graph, 0.5))
    kill_groups(ChannelGraph(whole, x[:2]), choose_groups(surgeon.graph, 0.5))  # same values on both sides
    opt_whole, opt_cut = torch.optim.Adam(whole.parameters()), torch.optim.Adam(cut.parameters())
    macs_before = surgeon.graph.macs()
    step_ms(cut, opt_cut, x, y, 2)  # optimizer state exists before the cut, as in a real run
    surgeon.remove(surgeon.find(), [opt_cut])
    ratio = macs_before / surgeon.graph.macs()
    run_whole = torch.compile(whole) if compiled else whole
    run_cut = torch.compile(cut) if compiled else cut
    before = min(step_ms(run_whole, opt_whole, x, y, steps) for _ in range(2))
    after = min(step_ms(run_cut, opt_cut, x, y, steps) for _ in range(2))
    return before, after, ratio


def compile_across_surgery() -> dict:
    """A compiled model trains, is cut, and trains on: how many graphs were compiled, and does it still agree?"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, surgeon = make("resnet18")
    compiled = torch.compile(model)
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.randn(64, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    step_ms(compiled, optimizer, x, y, 1)
    graphs_before = counters["stats"]["unique_graphs"]
    kill_groups(surgeon.graph, choose_groups(surgeon.graph, 0.4))
    surgeon.remove(surgeon.find(), [optimizer])
    step_ms(compiled, optimizer, x, y, 3)
    graphs_after = counters["stats"]["unique_graphs"]
    step_ms(compiled, optimizer, x, y, 3)
    graphs_later = counters["stats"]["unique_graphs"] - graphs_after
    with torch.no_grad():  # train mode, as compiled: the same batch statistics on both sides
        eager = copy.deepcopy(model)(x)
        error = ((compiled(x) - eager).abs().max() / eager.abs().max()).item()
    return {
        "graphs compiled for the training steps before the cut": graphs_before,
        "graphs compiled by the steps after it": graphs_after - graphs_before,
        "graphs compiled by later steps": graphs_later,
        "compiled vs eager forward after the cut, max abs difference / max abs output": f"{error:.1e}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--models", nargs="*", default=["resnet18", "resnet50"])
    parser.add_argument("--eager-only", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    global SIZE
    SIZE = args.size
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_surgery.py needs a CUDA GPU; bench/surgery.py measures the CPU.")
    console = Console()
    if not args.eager_only:
        for key, value in compile_across_surgery().items():
            console.print(f"torch.compile: {key}: {value}")
    steps = 10 if args.quick else 30
    table = Table(
        title=f"Training step before/after cutting 50% of channel groups, {SIZE}x{SIZE} inputs "
        f"({torch.cuda.get_device_name()})"
    )
    for column in ("model", "mode", "round_to", "batch", "ms before", "ms after", "speed-up", "MACs ratio", "efficiency"):
        table.add_column(column, justify="left" if column in ("model", "mode") else "right")
    models = args.models[:1] if args.quick else args.models
    modes = (False,) if args.eager_only else (False, True)
    cases = [(m, c, r) for m in models for c in modes for r in (1, 8) if not (c and m != models[0])]
    for name, compiled, round_to in cases:
        batch = args.batch
        before, after, ratio = speed(name, batch, steps, compiled, round_to)
        row = (name, "compiled" if compiled else "eager", str(round_to), str(batch), f"{before:.2f}", f"{after:.2f}",
               f"{before / after:.2f}x", f"{ratio:.2f}x", f"{before / after / ratio:.2f}")  # fmt: skip
        console.print(" | ".join(row))  # as it comes, in case the run is cut short
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
