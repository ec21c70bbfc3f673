"""`lsc-export checkpoint=PATH`: the ONNX file, TensorRT engine (where it exists) and report of a trained lsc-train run.

The model is rebuilt from the run's own config and `load_compressed` (surgeries replayed, quantizers and 2:4 masks
restored). Channels, parameters and multiply-accumulates "before" are those of the freshly built network.
"""

from __future__ import annotations

import dataclasses
import itertools
import tempfile
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .core.export import export_onnx
from .core.checkpoint import read_checkpoint
from .core.surgery import load_compressed
from .export_report import ExportOptions, check_output_path, export_and_report, layer_shapes, macs, parameter_count
from .models import ImageClassifier
from .train import CONFIG_DIR

__all__ = ["find_checkpoint", "find_run_config", "main", "run"]


def find_run_config(checkpoint: Path, given: str | None) -> Path:
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"run_config={given!r} does not exist: give the run's .hydra/config.yaml.")
        return Path(given)
    for parent in checkpoint.resolve().parents:
        if (parent / ".hydra" / "config.yaml").is_file():
            return parent / ".hydra" / "config.yaml"
    raise FileNotFoundError(
        f"No .hydra/config.yaml above {checkpoint}: the model cannot be rebuilt without the run's config. Pass "
        "run_config=<the lsc-train run's .hydra/config.yaml>."
    )


def find_checkpoint(given: str) -> Path:
    """`given` itself, or for a run directory its last.ckpt (lsc-train writes one at the end of every run), else its
    newest checkpoint."""
    path = Path(given)
    if path.is_dir():
        found = sorted(path.rglob("*.ckpt"), key=lambda p: (p.name == "last.ckpt", p.stat().st_mtime))
        if not found:
            raise FileNotFoundError(f"checkpoint={given!r} is a directory without a .ckpt file under it.")
        return found[-1]
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint={given!r} does not exist: give a Lightning checkpoint or an lsc-train run directory."
        )
    return path


def run(cfg: DictConfig) -> dict:
    check_output_path(cfg.output)  # before any work
    given = {k: (tuple(v) if k == "latency_batches" else v) for k, v in cfg.options.items()}
    options = ExportOptions(**{**given, "runtime": given.get("runtime") or "tensorrt"})
    checkpoint = find_checkpoint(cfg.checkpoint)
    state = read_checkpoint(checkpoint)  # before any work: a damaged or unsafe file is named first
    run_cfg = OmegaConf.load(find_run_config(checkpoint, cfg.run_config))
    if given.get("runtime") is None:  # the layout the run trained its int8 activations for
        trained_for = OmegaConf.select(run_cfg, "compression.activation_runtime", default=None)
        options = dataclasses.replace(options, runtime=trained_for or "tensorrt")
    module = ImageClassifier(instantiate(run_cfg.model), **run_cfg.optim)
    datamodule = instantiate(run_cfg.data)
    datamodule.setup("fit")
    wanted = max(options.calibrate_batches, options.parity_batches)
    batches = [x for x, _ in itertools.islice(datamodule.train_dataloader(), wanted)]
    before, parameters_before, macs_before = layer_shapes(module), parameter_count(module), macs(module, batches[0])
    with (
        tempfile.TemporaryDirectory() as scratch
    ):  # the network as built, in float32: the size compression started from
        original = export_onnx(module, batches[0], Path(scratch) / "original.onnx").file_bytes
    load_compressed(module, state)
    accuracy_batches = None
    if cfg.accuracy:
        datamodule.setup("test")
        accuracy_batches = datamodule.test_dataloader()
    return export_and_report(module, cfg.output, batches, options, before=before, parameters_before=parameters_before,
                             macs_before=macs_before, accuracy_batches=accuracy_batches,
                             extra={"original_float_file_bytes": original, "checkpoint": str(checkpoint)})  # fmt: skip


@hydra.main(config_path=CONFIG_DIR, config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
