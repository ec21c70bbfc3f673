"""Issue 12's checks on a CUDA GPU, prepared as one run for a lent device machine. Its image has torch, lightning,
onnx, onnxruntime and rich, but neither hydra nor the internet, so this uses no lsc-* command and reads the data from
a folder that travels with the tree:

    mkdir -p .gpu && cp /usr/share/datasets/fashion-mnist/*.gz .gpu/ && echo /.gpu/ >> .git/info/exclude
    device run, carry [".gpu"]:  PYTHONPATH=. PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --data .gpu

1. PyTorch's latency tables on the GPU (`widths="torch"`) for the main job's network at batch 64, in float32 and
   under bf16 autocast: each layer's steps, and the seconds the tables took.
2. A real Lightning run on the GPU in bf16-mixed: the main job's SelfCompression and ChannelSurgeon settings with
   the size term weighted by the GPU's latency (`latency_backend="torch"`) and `widths="torch"`, on Fashion-MNIST,
   for `--steps` steps: the steps it cut to (timed in bf16), its widths, accuracy and milliseconds per training step.
3. TensorRT, where `tensorrt` is importable: that run's exported file built into an engine, its outputs against
   PyTorch, timed against the float network's engine at batch 1 and 64; and the main job's network's latency
   tables as TensorRT int8 engines (`widths="tensorrt-int8"`), each layer's steps; else the import error, said.
4. That run's network against the float network as built, in PyTorch on the GPU: eager, torch.compile and CUDA
   graphs, float32 and bf16 autocast, at batch 1, 64 and 1024 (`bench/latency.py`'s CUDA rows).

One JSON report: each part printed as it is done, the whole in $OUT/gpu_check.json where OUT is set (a run cut off
keeps its finished parts). `--device cpu --latency-batch 2 --steps 40` runs it on this CPU in a few minutes (TensorRT
said unavailable, no latency weight, no part 4), which is how it is tested before a GPU is lent. Run on an H200 twice
on 2026-12-04 (docs/pages/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from lightning_selfcompress import ChannelSurgeon, SelfCompression
from lightning_selfcompress.core.export import export_onnx
from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.tensorrt import Engine, TensorRTUnavailable, build_engine
from lightning_selfcompress.core.widths import latency_tables
from lightning_selfcompress.data.fashion_mnist import FashionMNISTDataModule
from lightning_selfcompress.models import BaselineCNN, ImageClassifier

CONF = Path(__file__).resolve().parent.parent / "conf"


def main_job_options(group: str) -> dict:
    """The main job's options of a callback (conf/<group>), as the Hydra config gives them."""
    options = yaml.safe_load((CONF / group).read_text())
    options.pop("_target_")
    return options


def tables(device: str, batch: int, cache: Path) -> dict:
    model = BaselineCNN(1, 10, width=32).to(device).eval()
    x = torch.randn(2, 1, 28, 28, device=device)
    found = {}
    for name, autocast in (("float32", None), ("bf16 autocast", torch.bfloat16)):
        start = time.perf_counter()
        measured = latency_tables(ChannelGraph(model, x[:1]), x, backend="torch", batch=batch, cache_dir=cache,
                                  autocast=autocast)
        found[name] = {"seconds": round(time.perf_counter() - start, 1),
                       "device": next(iter(measured.values())).device,
                       "steps": {layer: t.step_widths() for layer, t in measured.items()},
                       "ms per width": {layer: [round(v, 4) for v in t.ms]
                                        for layer, t in measured.items()}}  # fmt: skip
    return found


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        self.sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self.start)


def train(device: str, data: str | None, steps: int, batch: int, scratch: Path) -> tuple[dict, ImageClassifier]:
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(BaselineCNN(1, 10, width=32), optimizer="adamw", lr=0.002, schedule="cosine")
    # The size term weighted by this GPU's own latency (the main job's: ONNX Runtime CPU's). Not in the CPU pass: bf16
    # tables at batch 64 take many minutes on a CPU (tests/test_widths.py runs that path small).
    options = {**main_job_options("compression/selfcompress.yaml"), "latency_backend": "torch"}
    compression = SelfCompression(**{**options, "latency_weight": options["latency_weight"] if device == "cuda" else 0})
    surgeon = ChannelSurgeon(**{**main_job_options("surgery/channel_surgeon.yaml"), "widths": "torch",
                                "latency_batch": batch})
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                         max_steps=steps, callbacks=[compression, surgeon, timer], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=scratch)  # fmt: skip
    datamodule = FashionMNISTDataModule(data_dir=data, batch_size=256)
    trainer.fit(module, datamodule)
    accuracy = trainer.test(module, datamodule, verbose=False)[0]
    report = compression.report()
    times = sorted(timer.times[10:]) or [math.nan]
    return {"steps": steps, "steps cut to": surgeon.step_widths, "surgeries": len(surgeon.history),
            "widths": {name: m.out_channels for name, m in module.named_modules() if hasattr(m, "out_channels")},
            "test": accuracy, "deployable bits per weight": report.deployable_bits_per_weight,
            "median ms per training step (after 10)": round(1e3 * times[len(times) // 2], 3)}, module  # fmt: skip


def tensorrt(module: ImageClassifier, batch: int, scratch: Path) -> dict:
    try:
        files = {"ours": scratch / "ours.onnx", "float": scratch / "float.onnx"}
        module = module.cpu().eval()
        export_onnx(module, torch.randn(1, 1, 28, 28), files["ours"])
        float_net = BaselineCNN(1, 10, width=32).eval()
        torch.onnx.export(float_net, (torch.randn(1, 1, 28, 28),), files["float"], dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})  # fmt: skip
        engines = {name: Engine(build_engine(path, path.with_suffix(".engine"))) for name, path in files.items()}
    except TensorRTUnavailable as error:
        return {"unavailable": str(error)}
    x = torch.randn(64, 1, 28, 28, device="cuda")
    with torch.no_grad():
        expected = module.cuda()(x)
    got = engines["ours"](x)
    times = {name: engine.latency_ms((1, 28, 28), [1, 64]) for name, engine in engines.items()}
    start, net, example = time.perf_counter(), BaselineCNN(1, 10, width=32).eval(), torch.randn(2, 1, 28, 28)
    measured = latency_tables(ChannelGraph(net, example[:1]), example, backend="tensorrt-int8", batch=batch,
                              rounds=1, cache_dir=scratch / "cache")  # fmt: skip
    return {"max |engine - PyTorch| / max |PyTorch|": float((got - expected).abs().max() / expected.abs().max()),
            "ms": times, "speed-up": {b: times["float"][b] / times["ours"][b] for b in (1, 64)},
            "latency tables (tensorrt-int8)": {"seconds": round(time.perf_counter() - start, 1),
                                               "steps": {n: t.step_widths() for n, t in measured.items()},
                                               "ms": {n: [round(v, 4) for v in t.ms] for n, t in measured.items()}}}


def pytorch_inference(module: ImageClassifier) -> list[dict]:
    """The run's network against the float one as built, eager and torch.compile, float32 and bf16 autocast."""
    from latency import cuda_rows  # bench/ is on the path when this runs as a script

    float_net = ImageClassifier(BaselineCNN(1, 10, width=32)).eval()
    return cuda_rows(float_net, module.eval(), torch.randn(2, 1, 28, 28), [1, 64, 1024], runs=50,
                     dtypes=(torch.float32, torch.bfloat16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="the folder holding Fashion-MNIST's four .gz files")
    parser.add_argument("--steps", type=int, default=600, help="training steps of the run (the main job: 1200)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--latency-batch", type=int, default=64, help="the tables' batch (2: a quick pass on a CPU)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU (--device cpu runs the same checks here)")
    report: dict = {"torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        keep(report, "1. latency tables", tables(args.device, args.latency_batch, scratch / "cache"))
        os.environ["XDG_CACHE_HOME"] = str(scratch / "run cache")  # the run times its own, in its own precision
        run, module = train(args.device, args.data, args.steps, args.latency_batch, scratch)
        keep(report, "2. a bf16-mixed run", run)
        keep(report, "3. TensorRT", tensorrt(module, args.latency_batch, scratch))
        keep(report, "4. PyTorch inference", pytorch_inference(module) if args.device == "cuda" else "needs CUDA")


def keep(report: dict, part: str, result) -> None:
    """Print a part as soon as it is measured and write the report so far: a run cut off by the device's time limit
    keeps the parts it finished."""
    report[part] = result
    print(json.dumps({part: result}, indent=1, default=str), flush=True)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
