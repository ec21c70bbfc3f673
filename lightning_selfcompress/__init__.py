"""A network that compresses itself while it trains: learned per-channel bit depths inside a Lightning run."""

from .callbacks import ChannelSurgeon, CompressedExport, Distillation, SelfCompression, Sparsity24
from .core import ChannelGraph, QuantizationConfig, SizeModel, Surgeon, attach_quantizers, load_compressed, quantize

__all__ = [
    "ChannelGraph",
    "ChannelSurgeon",
    "CompressedExport",
    "Distillation",
    "QuantizationConfig",
    "SelfCompression",
    "SizeModel",
    "Sparsity24",
    "Surgeon",
    "attach_quantizers",
    "load_compressed",
    "quantize",
]
__version__ = "0.1.0"
