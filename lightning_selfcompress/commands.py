"""The `lsc-*` console scripts: each checks that the extras it needs are installed (naming the one to install)
before importing its module, which imports them at the top."""

from __future__ import annotations

from importlib import import_module

from .extras import require

_TRAIN = ("lightning", "torchmetrics", "rich", "hydra", "omegaconf", "matplotlib", "torchvision", "onnx", "onnxruntime")


def _run(command: str, module: str, needs: tuple[str, ...]) -> None:
    require(command, *needs)
    import_module(module, __package__).main()


def train() -> None:
    _run("lsc-train", ".train", _TRAIN)


def export() -> None:
    _run("lsc-export", ".export_cli", _TRAIN)


def check24() -> None:
    _run("lsc-check24", ".check24", ("rich", "onnx"))


def pareto() -> None:
    _run("lsc-pareto", ".pareto", ("yaml", "matplotlib"))


def latency() -> None:
    _run("lsc-latency", ".latency_cli", ("rich", "hydra", "omegaconf", "onnx", "onnxruntime", "torchvision"))
