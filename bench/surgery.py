"""Channel surgery on CPU, each side measured in the same run. `python bench/surgery.py [--quick]`.

1. Training speed-up from removing channels. ResNet-9 and the baseline CNN (Fashion-MNIST-shaped batches) and
   torchvision's ResNet-18 (CIFAR-shaped), quantized; half of the removable channel groups are killed (bit depth 0,
   constant output 0) and cut with `Surgeon.find()` + `Surgeon.remove()`, the Adam optimizer carrying on across the
   cut. Two identical models are built from one seed and only one is cut; rounds alternate between them three
   times and each side keeps its best median step time, so drift in machine speed hits both alike. The measured
   speed-up is set against the multiply-accumulate ratio (`ChannelGraph.macs()`): efficiency = measured / MACs.
   Each model is cut twice: as found (round_to=1), and with widths kept multiples of the SIMD width (round_to=16),
   and runs in two memory layouts: PyTorch's default (NCHW) and channels_last (NHWC), in which oneDNN's
   convolutions scale with the width far more smoothly.
2. One surgery on torchvision's ResNet-50 against Torch-Pruning (`pip install -e '.[bench]'`): the same 30% of the
   removable channel groups removed by `Surgeon.remove` and by Torch-Pruning's `get_pruning_group(...).prune()`,
   each on a fresh copy of the model, its graph built beforehand and timed apart (`ChannelGraph(model, x)` against
   Torch-Pruning's `DependencyGraph().build_dependency`). Both results must have the same parameter count and
   compute the same function.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.surgery import Removal, Surgeon
from lightning_selfcompress.models import BaselineCNN, ResNet9
from lightning_selfcompress.testing import choose_groups, kill_groups, removable_groups

EFFICIENCY_GOAL = 0.8
SIMD_WIDTH = 16  # float32 lanes of AVX-512; the second row of each model keeps widths multiples of it


# ---- 1. training speed-up from channel removal ----------------------------------------------------------------------


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def median_step_ms(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, steps: int,
                   warmup: int) -> float:  # fmt: skip
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        train_step(model, optimizer, x, y)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def killed_model(make_net: Callable[[], nn.Module], x: Tensor, y: Tensor, layout: torch.memory_format):
    """A quantized model that trained two Adam steps (so the optimizer has state), then had half of its removable
    channel groups killed the way self-compression leaves them: bits 0, producer bias, norm shift and mean 0."""
    torch.manual_seed(0)
    model = make_net().to(memory_format=layout)
    attach_quantizers(model)
    graph = ChannelGraph(model, x[:2])
    optimizer = torch.optim.Adam(model.parameters())
    for _ in range(2):
        train_step(model, optimizer, x, y)
    chosen = choose_groups(graph, 0.5, seed=0)
    kill_groups(graph, chosen)
    return model, optimizer, graph, chosen


def speedup_row(name: str, make_net: Callable[[], nn.Module], shape: tuple[int, ...], batch: int, round_to: int,
                layout: torch.memory_format, steps: int, warmup: int, rounds: int) -> dict:  # fmt: skip
    torch.manual_seed(1)
    x, y = torch.randn(batch, *shape).to(memory_format=layout), torch.randint(0, 10, (batch,))
    whole, whole_optimizer, _, _ = killed_model(make_net, x, y, layout)
    cut, cut_optimizer, graph, chosen = killed_model(make_net, x, y, layout)
    surgeon = Surgeon(graph, round_to=round_to)
    removable = int(removable_groups(graph).sum())
    macs_before = graph.macs()
    removal = surgeon.find()
    record = surgeon.remove(removal, [cut_optimizer])
    macs_after = graph.macs()
    whole.eval(), cut.eval()
    with torch.no_grad():  # the cut changes nothing the network computes
        difference = float((whole(x) - cut(x)).abs().max())
    whole.train(), cut.train()
    before, after = [], []
    for _ in range(rounds):  # alternate, so drift in machine speed hits both; keep each side's best
        before.append(median_step_ms(whole, whole_optimizer, x, y, steps, warmup))
        after.append(median_step_ms(cut, cut_optimizer, x, y, steps, warmup))
    b, a = min(before), min(after)
    return {
        "name": name, "batch": batch, "groups": f"{removal.count}/{int(chosen.sum())} of {removable}",
        "weights": record.weights_removed, "macs": macs_before / macs_after, "before": b, "after": a,
        "speedup": b / a, "efficiency": (b / a) / (macs_before / macs_after), "difference": difference,
    }  # fmt: skip


def speedup_table(quick: bool) -> Table:
    steps, warmup, rounds = (4, 1, 2) if quick else (20, 3, 3)
    cases = [
        ("ResNet-9", lambda: ResNet9(in_channels=1, num_classes=10), (1, 28, 28), 32),
        ("baseline CNN", lambda: BaselineCNN(), (1, 28, 28), 256),
        ("ResNet-18", lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32), 32),
    ]
    table = Table(
        title=f"1. Training step before / after cutting 50% of the removable channel groups (CPU, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads; Adam, median of {steps} steps, best of "
              f"{rounds} alternating rounds)",
        caption=f"Goal: efficiency = measured speed-up / MACs speed-up >= {EFFICIENCY_GOAL} on CPU. groups: cut by "
                "find() / killed, of removable. round_to: Surgeon(graph, round_to=k) gives groups back so that a "
                f"width that was a multiple of k stays one ({SIMD_WIDTH}: the float32 lanes of AVX-512). max |Δ|: "
                "eval-mode logits, cut vs uncut model.",
    )  # fmt: skip
    for column in ("model", "batch", "layout", "round_to", "groups", "weights removed", "MACs before/after", "step before",
                   "step after", "speed-up", "efficiency", "max |Δ|"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("model", "groups") else "right")
    layouts = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
    for (name, make_net, shape, batch), layout, round_to in itertools.product(cases, layouts, (1, SIMD_WIDTH)):
        r = speedup_row(name, make_net, shape, batch, round_to, layouts[layout], steps, warmup, rounds)
        colour = "green" if r["efficiency"] >= EFFICIENCY_GOAL else "red"
        table.add_row(
            f"{r['name']} {'x'.join(map(str, shape))}", str(r["batch"]), layout, str(round_to), r["groups"],
            f"{r['weights']:,}", f"{r['macs']:.2f}x", f"{r['before']:.1f} ms", f"{r['after']:.1f} ms",
            f"{r['speedup']:.2f}x", f"[{colour}]{r['efficiency']:.2f}[/{colour}]", f"{r['difference']:.1e}",
        )  # fmt: skip
    return table


# ---- 2. one surgery on ResNet-50 vs Torch-Pruning ------------------------------------------------------------------


def plain_conv_groups(graph: ChannelGraph) -> Tensor:
    """Removable groups whose every producer is a plain (groups=1) convolution."""
    plain = torch.zeros(graph.num_groups, dtype=torch.bool)
    other = torch.zeros(graph.num_groups, dtype=torch.bool)
    for name, groups in graph.outputs.items():
        module = graph.model.get_submodule(name)
        (plain if isinstance(module, nn.Conv2d) and module.groups == 1 else other)[groups] = True
    return removable_groups(graph) & plain & ~other


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ours(base: nn.Module, x: Tensor, mask: Tensor) -> tuple[float, float, nn.Module]:
    """(seconds to build the graph, seconds for the surgery, the cut model)."""
    model = copy.deepcopy(base)
    start = time.perf_counter()
    surgeon = Surgeon(ChannelGraph(model, x))
    built = time.perf_counter()
    surgeon.remove(Removal(mask.clone()))
    return built - start, time.perf_counter() - built, model


def ours_find(base: nn.Module, x: Tensor, mask: Tensor) -> tuple[float, int]:
    """find() on a quantized copy with the chosen groups killed: how long deciding which groups may go takes."""
    model = copy.deepcopy(base)
    attach_quantizers(model)
    graph = ChannelGraph(model, x)
    kill_groups(graph, mask)
    surgeon = Surgeon(graph)
    start = time.perf_counter()
    removal = surgeon.find()
    seconds = time.perf_counter() - start
    return seconds, int((removal.groups & mask).sum())


def torch_pruning(tp, base: nn.Module, x: Tensor, channels: dict[str, list[int]]) -> tuple[float, float, nn.Module]:
    """The same as `ours`, by Torch-Pruning."""
    model = copy.deepcopy(base)
    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
    built = time.perf_counter()
    modules = dict(model.named_modules())
    for name, idxs in channels.items():  # one request per coupled group: Torch-Pruning prunes the coupled layers
        graph.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs=idxs).prune()
    return built - start, time.perf_counter() - built, model


def resnet50_table(quick: bool, console: Console) -> Table | None:
    try:
        import torch_pruning as tp
    except ImportError:
        console.print(
            "[yellow]2. skipped: Torch-Pruning, the comparison baseline, is not installed. Install it with "
            "`pip install -e '.\\[bench]'` (or `pip install torch-pruning`).[/yellow]"
        )
        return None
    size, reps = (64, 2) if quick else (224, 5)
    torch.manual_seed(0)
    base = torchvision.models.resnet50().eval()  # eval: tracing leaves the running statistics alone
    x = torch.randn(1, 3, size, size)
    graph = ChannelGraph(copy.deepcopy(base), x)  # group numbering is deterministic: the same on every copy
    candidates = plain_conv_groups(graph).nonzero().flatten()
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(graph.num_groups, dtype=torch.bool)
    mask[candidates[order[: int(0.3 * len(candidates))]]] = True
    channels: dict[str, list[int]] = {}
    for group in mask.nonzero().flatten().tolist():  # each group by its first producer only
        module, channel = graph.key(group)
        channels.setdefault(module, []).append(channel)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        our_times, tp_times = [], []
        for _ in range(reps):  # alternate, fresh copies each time; keep each side's best
            *seconds, our_model = ours(base, x, mask)
            our_times.append(seconds)
            *seconds, tp_model = torch_pruning(tp, base, x, channels)
            tp_times.append(seconds)
        find_seconds, found = ours_find(base, x, mask)
        with torch.no_grad():
            difference = float((our_model(x) - tp_model(x)).abs().max())
    (ours_build, ours_s), (tp_build, tp_s) = ([min(column) for column in zip(*t)] for t in (our_times, tp_times))
    ours_params, tp_params = parameter_count(our_model), parameter_count(tp_model)
    same = ours_params == tp_params and all(
        a.shape == b.shape for a, b in zip(our_model.parameters(), tp_model.parameters(), strict=True)
    )
    table = Table(
        title=f"2. One surgery on ResNet-50 (1x3x{size}x{size}): {int(mask.sum())} of {len(candidates)} removable "
              f"channel groups, producers in {len(channels)} convs (best of {reps})",
        caption=f"Parameters: {parameter_count(base):,} before; ours {ours_params:,}, Torch-Pruning {tp_params:,}: "
                + ("[green]the same layer shapes[/green]" if same else "[red]DIFFERENT layer shapes[/red]")
                + f"; max |Δ| of their eval-mode outputs {difference:.1e}. Each graph built on a fresh copy, then cut.",
    )  # fmt: skip
    for column in ("what", "time", "ratio to ours (the same step)"):
        table.add_column(column, justify="left" if column == "what" else "right")
    table.add_row("ours: ChannelGraph(model, x), the graph", f"{1000 * ours_build:.1f} ms", "1.00x")
    table.add_row(f"Torch-Pruning {tp.__version__}: DependencyGraph().build_dependency, the graph",
                  f"{1000 * tp_build:.1f} ms", f"{tp_build / ours_build:.2f}x")  # fmt: skip
    table.add_row("ours: Surgeon.remove(Removal(mask))", f"{1000 * ours_s:.1f} ms", "1.00x")
    table.add_row(f"Torch-Pruning {tp.__version__}: get_pruning_group + prune, per conv", f"{1000 * tp_s:.1f} ms",
                  f"{tp_s / ours_s:.2f}x")  # fmt: skip
    table.add_row(f"ours: Surgeon.find() (quantized copy, same groups killed; found {found}/{int(mask.sum())})",
                  f"{1000 * find_seconds:.1f} ms", f"{find_seconds / ours_s:.2f}x")  # fmt: skip
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller ResNet-50 input (a smoke run)")
    args = parser.parse_args()
    console = Console(width=max(Console().width, 160))
    start = time.perf_counter()
    console.print(speedup_table(args.quick))
    table = resnet50_table(args.quick, console)
    if table is not None:
        console.print(table)
    console.print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
