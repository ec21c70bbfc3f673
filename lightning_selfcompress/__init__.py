"""A network that compresses itself while it trains: learned per-channel bit depths inside a Lightning run."""

from .callbacks import ChannelSurgeon, CompressedExport, Distillation, SelfCompression, Sparsity24
from .core import (
    ChannelGraph, QuantizationConfig, Rule, SizeModel, Surgeon, attach_quantizers, load_compressed, quantize,
    register_rule,
)  # fmt: skip

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
