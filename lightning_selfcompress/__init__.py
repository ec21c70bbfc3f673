"""A network that compresses itself while it trains: learned per-channel bit depths inside a Lightning run.

The core (`lightning_selfcompress.core`) is plain PyTorch; the Lightning callbacks are imported on first use, so
a training loop without Lightning imports none of it.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .core import (
    ChannelGraph, QuantizationConfig, Rule, SizeModel, Surgeon, attach_quantizers, load_compressed, quantize,
    register_rule,
)  # fmt: skip

if TYPE_CHECKING:
    from .callbacks import ChannelSurgeon, CompressedExport, Distillation, SelfCompression, Sparsity24

_CALLBACKS = ("ChannelSurgeon", "CompressedExport", "Distillation", "SelfCompression", "Sparsity24")


def __getattr__(name: str):
    if name in _CALLBACKS:
        return getattr(import_module(".callbacks", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ChannelGraph",
    "ChannelSurgeon",
    "CompressedExport",
    "Distillation",
    "QuantizationConfig",
    "Rule",
    "SelfCompression",
    "SizeModel",
    "Sparsity24",
    "Surgeon",
    "attach_quantizers",
    "load_compressed",
    "quantize",
    "register_rule",
]
__version__ = "0.1.0"
