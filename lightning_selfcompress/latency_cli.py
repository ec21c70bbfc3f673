"""`lsc-latency`: the latency tables of a model's prunable layers on this machine (ONNX Runtime on the CPU by default),
and the widths the surgeon would cut each to (`ChannelSurgeon(widths="onnxruntime-cpu")` reads the same cache).

    lsc-latency                                   # the main job's network (conf/model/baseline_cnn.yaml), 1x28x28
    lsc-latency --model resnet9 --set width=16 --batch 1
    lsc-latency --int8                            # ONNX Runtime's integer kernels (widths="onnxruntime-cpu-int8")
    lsc-latency --tensorrt                        # TensorRT's int8 engines on this GPU (widths="tensorrt-int8")
    lsc-latency --torch --device cuda             # PyTorch eager on a GPU (widths="torch" in a GPU run)
    lsc-latency --torch --device cuda --autocast bfloat16   # the same as a bf16-mixed run computes
    lsc-latency --round-to 8                      # the steps a surgeon with round_to=8 cuts to
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.table import Table

from .core.groups import ChannelGraph
from .core.tensorrt import TensorRTUnavailable
from .core.widths import default_cache_dir, latency_tables
from .report import make_console


def main(argv: list[str] | None = None) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from .train import CONFIG_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="baseline_cnn", help="a config in conf/model (default: baseline_cnn)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the model config")
    parser.add_argument("--input", type=int, nargs="+", default=[1, 28, 28], help="one sample's shape (C H W)")
    parser.add_argument("--batch", type=int, default=64, help="the batch size at which latency is measured")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per width (the median counts)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all widths (the best counts)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="a step is at least this much faster")
    parser.add_argument("--round-to", type=int, default=1, help="only steps that are multiples of this (as round_to)")
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument("--int8", action="store_true", help="time the int8 layout (integer kernels)")
    backend.add_argument("--tensorrt", action="store_true", help="time TensorRT's int8 engines on this CUDA GPU")
    backend.add_argument("--torch", action="store_true", help="time PyTorch eager (float32) instead of ONNX Runtime")
    parser.add_argument("--device", default="cpu", help="with --torch: the device to time on (cpu, cuda, cuda:1)")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], help="with --torch: time under torch.autocast "
                        "to this type, as a run with precision=bf16-mixed or 16-mixed computes")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=None, help=f"cache folder (default {default_cache_dir()})")
    args = parser.parse_args(argv)

    if args.round_to < 1:
        parser.error(f"--round-to {args.round_to}: must be a positive integer (1: any width)")
    config_path = Path(CONFIG_DIR) / "model" / f"{args.model}.yaml"
    if not config_path.is_file():
        choices = sorted(p.stem for p in config_path.parent.glob("*.yaml"))
        parser.error(f"no model config '{args.model}' in {config_path.parent}; choose one of {choices}")
    config = OmegaConf.merge(OmegaConf.load(config_path), OmegaConf.from_dotlist(args.set))
    if args.device != "cpu" and not args.torch:
        parser.error(f"--device {args.device}: ONNX Runtime's tables are timed on the CPU; add --torch")
    if args.autocast and not args.torch:
        parser.error(f"--autocast {args.autocast}: ONNX Runtime's tables time the file's own types; add --torch")
    try:
        device = torch.device(args.device)
        model = instantiate(config).eval().to(device)
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    example = torch.randn(2, *args.input, device=device)
    backend = ("torch" if args.torch else "onnxruntime-cpu-int8" if args.int8 else
               "tensorrt-int8" if args.tensorrt else "onnxruntime-cpu")  # fmt: skip
    try:
        tables = latency_tables(ChannelGraph(model, example[:1]), example, backend=backend, batch=args.batch,
                                runs=args.runs, rounds=args.rounds, cache_dir=args.cache,
                                autocast=getattr(torch, args.autocast) if args.autocast else None)  # fmt: skip
    except TensorRTUnavailable as error:
        parser.error(f"--tensorrt: {error}")
    first = next(iter(tables.values()))
    table = Table(title=f"Latency against width, {backend}, batch {args.batch}, {first.device}; channel block "
                        f"{first.block} (a layer on it steps on its multiples)")
    for column in ("layer", "width", "ms at full width", "ms at half", "widths it may be cut to (steps)"):
        table.add_column(column, justify="left" if column in ("layer", "widths it may be cut to (steps)") else "right")
    for name, t in tables.items():
        full = t.widths[-1]
        half = next(ms for width, ms in zip(t.widths, t.ms) if width >= full / 2)  # the timed width nearest above
        table.add_row(name, str(full), f"{t.ms[-1]:.3f}", f"{half:.3f}" if full > 1 else "",
                      ", ".join(map(str, t.step_widths(args.tolerance, args.round_to))))  # fmt: skip
    make_console().print(table)


if __name__ == "__main__":
    main()
