"""`lsc-train`: train a reference network with self-compression and write a JSON report. Hydra entry point."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from .callbacks import ChannelSurgeon, CompressedExport, Distillation, SelfCompression, Sparsity24
from .core.checkpoint import read_checkpoint
from .core.surgery import SURGERY_KEY
from .core.size import LayerShape, float_size_report
from .export_report import activations_note
from .models import ImageClassifier
from .plots import write_size_plot
from .report import make_console, print_size_table, write_json


def _required(what: str) -> None:
    raise ValueError(f"This configuration needs {what}.")


if not OmegaConf.has_resolver("required"):  # `key: ${required:what it is and how to give it}` in a config
    OmegaConf.register_new_resolver("required", _required)

_PACKAGED = Path(__file__).parent / "conf"
CONFIG_DIR = str(_PACKAGED if _PACKAGED.is_dir() else Path(__file__).parent.parent / "conf")


def _surgery_summary(surgeon: ChannelSurgeon | None, module: pl.LightningModule) -> dict | None:
    if surgeon is None or surgeon.surgeon is None:
        return None
    rows = surgeon.summary(module)
    total = LayerShape.total(rows)
    return {
        "surgeries": len(surgeon.history),
        "channels": total.channels,
        "channels_alive": total.channels_alive,
        "weights": total.weights,
        "weights_kept": total.weights_kept,
        "macs_before": surgeon.original_macs,
        "macs_after": surgeon.surgeon.graph.macs(),
        "layers": [asdict(row) for row in rows],
        "history": [r.to_dict() for r in surgeon.history],
    }


def _surgery_line(s: dict) -> str:
    return (
        f"Surgery: {s['surgeries']} cuts, {s['channels_alive']}/{s['channels']} channels and "
        f"{s['weights_kept']:,}/{s['weights']:,} weights and {s['macs_after']:,}/{s['macs_before']:,} "
        "multiply-accumulates per sample left.\n"
    )


def _export_line(e: dict) -> str:
    if "error" in e:
        return f"Export of {e['path']} failed (no file written): {e['error']}\n"
    return (
        f"Export: {e['path']}, {e['file_bytes']:,} bytes ({e['float_file_bytes']:,} with float32 weights), parity "
        f"{e['parity']['max_rel']:.2g} relative{activations_note(e)}, ONNX Runtime CPU "
        + ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in e["ort_cpu_latency_ms"].items())
        + ".\n"
    )


def _load_weights(module: ImageClassifier, path: str, option: str = "init_from", hint: str = "") -> None:
    """A Lightning checkpoint of the module, or a plain state_dict of its network (torchvision's .pth files)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{option}={path!r} does not exist: give the path of a Lightning checkpoint (.ckpt) or of the network's "
            "state_dict (e.g. torchvision's resnet50-0676ba61.pth)."
        )
    state = read_checkpoint(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{option}={path!r} holds no state_dict: give a Lightning checkpoint or a network's state_dict."
        )
    if any(key.endswith((".weight_quantizer.bits", ".weight_mask")) for key in state):
        raise ValueError(
            f"{option}={path!r} comes from a compressed or sparse run: start from a dense float one (trained with "
            "compression=float surgery=none sparsity=none), or continue that run with ckpt_path= instead."
        )
    if not any(key.startswith("net.") for key in state):
        state = {f"net.{key}": value for key, value in state.items()}
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        model = type(module.net).__name__
        raise ValueError(f"{option}={path!r} does not fit model={model} as configured{hint}: {error}") from error


def _check_resume(path: str, surgeon: ChannelSurgeon | None) -> None:
    """A checkpoint of a cut network continues only with a surgeon, which replays its history before the weights
    load; without one Lightning would print a size mismatch per layer and no hint."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"ckpt_path={path!r} does not exist: give a checkpoint of an lsc-train run.")
    if surgeon is not None:  # it replays the history itself; Lightning reads the file once
        return
    cuts = len((read_checkpoint(path).get(SURGERY_KEY) or {}).get("history", []))
    if cuts:
        raise ValueError(
            f"ckpt_path={path!r} holds a network the channel surgeon cut {cuts} times, and this run has no "
            "surgeon to replay those cuts before the weights load: continue it with the run's own surgery setting "
            "(surgery=channel_surgeon), or read the cut network with load_compressed()."
        )


def _sparsity_summary(sparsity: Sparsity24 | None) -> dict | None:
    if sparsity is None:
        return None
    core = sparsity.sparsifier
    permutation = sparsity.permutation.to_dict() if sparsity.permutation is not None else None
    return {"pruned": core.pruned, "kept_magnitude": core.kept_magnitude, "dense_layers": core.skipped,
            "permutation": permutation}


def _distillation(cfg: DictConfig, datamodule: pl.LightningDataModule, out_dir: Path) -> Distillation | None:
    """The teacher: the network in float (as `distill.model` changes it: a wider one, say), from `distill.teacher`
    (a float run's checkpoint), or with `distill.teacher=train` trained here first, with the same data, optimizer
    and steps (its log in `teacher/`)."""
    if not cfg.get("distill"):
        return None
    model = OmegaConf.merge(cfg.model, cfg.distill.get("model") or {})
    teacher = ImageClassifier(instantiate(model), num_classes=model.num_classes, **cfg.optim)
    if cfg.distill.teacher == "train":
        logger = CSVLogger(out_dir, name="teacher", version="")
        trainer = pl.Trainer(**{**cfg.trainer, "enable_checkpointing": False}, logger=logger, default_root_dir=out_dir)
        trainer.fit(teacher, datamodule)
        pl.seed_everything(cfg.seed, workers=True)  # the student starts as it would without a teacher
    else:
        _load_weights(teacher, cfg.distill.teacher, "distill.teacher", hint="; a teacher of another size needs "
                      "distill.model (e.g. +distill.model.width=32)")
    return Distillation(teacher, weight=cfg.distill.weight, temperature=cfg.distill.temperature)


def _method(compression: SelfCompression | None, distillation: Distillation | None) -> str:
    method = compression.method if compression else "float"
    return f"{method} + distillation" if distillation else method


def _callback(cfg: DictConfig, group: str) -> pl.Callback | None:
    """The group's callback, or None where the group chose none (compression=float, surgery=none). An experiment's
    options for the group (ResNet-9's compression.latency_weight) then have nothing to set: said, and left behind, so
    that an experiment's float baseline is its command with the group turned off."""
    options = cfg.get(group)
    if not options:
        return None
    if "_target_" not in options:
        rank_zero_warn(f"{group}: none chosen, so its options {sorted(options)} (an experiment's, or given) "
                       "do not apply")
        return None
    return instantiate(options)


def run(cfg: DictConfig) -> dict:
    """Fit, test, and report; returns the report that is also written to `cfg.report_path`."""
    OmegaConf.resolve(cfg)  # a value left ${required:...}: fail before anything is built
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.report_path).parent
    datamodule = instantiate(cfg.data)
    distillation = _distillation(cfg, datamodule, out_dir)
    module = ImageClassifier(instantiate(cfg.model), num_classes=cfg.model.num_classes, **cfg.optim)
    if cfg.get("init_from"):
        _load_weights(module, cfg.init_from)
    compression: SelfCompression | None = _callback(cfg, "compression")
    surgeon: ChannelSurgeon | None = _callback(cfg, "surgery")
    sparsity: Sparsity24 | None = _callback(cfg, "sparsity")
    export: CompressedExport | None = _callback(cfg, "export")
    # Names without '=' (a Hydra override takes them unquoted), and last.ckpt at the end of every run, short or not
    checkpoints = (
        ModelCheckpoint(filename="epoch{epoch}-step{step}", auto_insert_metric_name=False, save_last=True)
        if cfg.trainer.get("enable_checkpointing", True)
        else None
    )
    trainer = pl.Trainer(
        **cfg.trainer,
        callbacks=[c for c in (compression, surgeon, sparsity, distillation, export, checkpoints) if c],
        logger=CSVLogger(out_dir, name="csv", version=""),
        default_root_dir=out_dir,
    )
    if cfg.get("ckpt_path"):
        _check_resume(cfg.ckpt_path, surgeon)
    start = time.perf_counter()
    try:
        # weights_only: a checkpoint is read as data, never as code (torch < 2.6 would default to unpickling anything)
        trainer.fit(module, datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except Exception as error:
        if export is None or export.error is not error:
            raise
        # the model trained; only its export at the end of fit failed: test and report it, then raise
    train_seconds = time.perf_counter() - start
    (test,) = trainer.test(module, datamodule, verbose=False)
    size = compression.report() if compression else float_size_report(module)
    report = {
        "name": cfg.name,
        "method": _method(compression, distillation),
        "test_accuracy": test["test/accuracy"],
        **size.to_dict(),
        "surgery": _surgery_summary(surgeon, module),
        "sparsity": _sparsity_summary(sparsity),
        "export": export.report if export else None,
        "checkpoint": checkpoints.last_model_path if checkpoints else None,
        "train_steps": trainer.global_step,
        "train_seconds": round(train_seconds, 1),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        path = write_json(cfg.report_path, report)
        write_size_plot(out_dir / "csv" / "metrics.csv", out_dir / "size.png")  # bits and weights over training
        console = make_console()
        if not compression:
            print_size_table(size, title="Float32 network: size per layer", console=console)
        console.print(
            f"[bold]{cfg.name}[/]: test accuracy {100 * report['test_accuracy']:.2f}%, "
            f"{size.deployable_bits_per_weight:.3f} bits per weight deployable (whole bits per channel; "
            f"{size.bits_per_weight:.3f} with real-valued bit depths, {size.percent_of_float32:.2f}% of float32 bits), "
            f"{size.size_bytes:,} bytes vs {size.float32_bytes:,} float32 bytes, "
            f"{size.channels_alive}/{size.channels} channels alive, {train_seconds:.0f} s of training.\n"
            + (_surgery_line(report["surgery"]) if report["surgery"] else "")
            + (_export_line(report["export"]) if report["export"] else "")
            + f"Report: {path}"
        )
    if export is not None and export.error is not None:
        raise export.error
    return report


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
