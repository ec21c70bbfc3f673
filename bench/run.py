"""Benchmarks, each a ratio measured side by side in one run. `python bench/run.py [--quick]`.

1. Training step time with SelfCompression attached vs the same float model, in real Lightning runs on CPU
   (the baseline CNN and ResNet-9 on Fashion-MNIST-shaped batches). Runs alternate float / compressed three
   times; the best of each side's median step times are compared.
2. The quantizer's forward+backward vs `torch.fake_quantize_per_channel_affine` (fixed scale, gradient to the
   input only) and vs `torch._fake_quantize_learnable_per_channel_affine` (LSQ: gradients to scale and zero
   point too, the closest built-in analogue), at the weight shapes of those networks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console
from rich.table import Table
from torch.utils.benchmark import Timer
from torch.utils.data import DataLoader, TensorDataset

from lightning_selfcompress import SelfCompression
from lightning_selfcompress.core.quant import quantize
from lightning_selfcompress.models import BaselineCNN, ImageClassifier, ResNet9


class StepTimer(Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


def median_step(make_net, batch: int, steps: int, compressed: bool) -> float:
    pl.seed_everything(0, verbose=False)
    data = TensorDataset(torch.randn(batch * (steps + 3), 1, 28, 28), torch.randint(0, 10, (batch * (steps + 3),)))
    timer = StepTimer(warmup=3)
    callbacks = [timer, SelfCompression(gamma=0.05, quantizer_lr=0.05)] if compressed else [timer]
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps + 3, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(ImageClassifier(make_net()), DataLoader(data, batch_size=batch))
    return statistics.median(timer.times)


def step_time_rows(quick: bool) -> list[tuple[str, str, float, float]]:
    steps, rounds = (5, 1) if quick else (30, 3)
    cases = [
        ("baseline CNN, batch 256", lambda: BaselineCNN(), 256),
        ("ResNet-9, batch 32", lambda: ResNet9(in_channels=1), 32),
    ]
    rows = []
    for name, make_net, batch in cases:
        float_times, compressed_times = [], []
        for _ in range(rounds):  # alternate, so drift in machine speed hits both; keep each side's best
            float_times.append(median_step(make_net, batch, steps, compressed=False))
            compressed_times.append(median_step(make_net, batch, steps, compressed=True))
        f, c = min(float_times), min(compressed_times)
        rows.append((f"train step: {name}", "SelfCompression / float", c / f, f"{1000 * c:.1f} ms vs {1000 * f:.1f} ms"))
    return rows


def quantizer_rows(quick: bool) -> list[tuple[str, str, float, str]]:
    shapes = [(32, 32, 5, 5), (64, 64, 3, 3), (512, 512, 3, 3)]
    rows = []
    for shape in shapes:
        c = shape[0]
        w = torch.randn(shape, requires_grad=True)
        bits = torch.full((c,), 4.0, requires_grad=True)
        exponent = torch.full((c,), -4.0, requires_grad=True)
        scale = torch.full((c,), 2.0**-4, requires_grad=True)
        zero = torch.zeros(c, dtype=torch.int32)
        zero_float = torch.zeros(c, requires_grad=True)
        g = torch.randn(shape)
        stmts = {
            "ours": "quantize(w, bits, exponent).backward(g)",
            "fake_quantize": "torch.fake_quantize_per_channel_affine(w, scale.detach(), zero, 0, -8, 7).backward(g)",
            "lsq": "torch._fake_quantize_learnable_per_channel_affine(w, scale, zero_float, 0, -8, 7, 1.0).backward(g)",
        }
        env = dict(torch=torch, quantize=quantize, w=w, bits=bits, exponent=exponent, scale=scale, zero=zero,
                   zero_float=zero_float, g=g)
        seconds = {k: Timer(s, globals=env).blocked_autorange(min_run_time=0.2 if quick else 1.0).median
                   for k, s in stmts.items()}
        size = "x".join(map(str, shape))
        rows.append((f"quantizer fwd+bwd {size}", "ours / fake_quantize_per_channel", seconds["ours"] / seconds["fake_quantize"],
                     f"{1e6 * seconds['ours']:.0f} us vs {1e6 * seconds['fake_quantize']:.0f} us"))
        rows.append((f"quantizer fwd+bwd {size}", "ours / learnable (LSQ) per channel", seconds["ours"] / seconds["lsq"],
                     f"{1e6 * seconds['ours']:.0f} us vs {1e6 * seconds['lsq']:.0f} us"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and shorter timings (a smoke run)")
    args = parser.parse_args()
    table = Table(title=f"lightning_selfcompress benchmarks (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for column in ("what", "ratio of", "ratio", "times"):
        table.add_column(column, justify="right" if column == "ratio" else "left")
    for what, of, ratio, times in quantizer_rows(args.quick) + step_time_rows(args.quick):
        table.add_row(what, of, f"{ratio:.2f}x", times)
    Console().print(table)


if __name__ == "__main__":
    main()
