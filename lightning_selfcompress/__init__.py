"""A network that compresses itself while it trains: learned per-channel bit depths inside a Lightning run.

The core (`lightning_selfcompress.core`) is plain PyTorch; the Lightning callbacks are imported on first use, so
a training loop without Lightning imports none of it.
"""

from typing import TYPE_CHECKING

from .core import (
    ChannelGraph,
    QuantizationConfig,
    Rule,
    SelfCompressor,
    SizeModel,
    Surgeon,
    attach_quantizers,
    load_compressed,
    quantize,
    register_rule,
)  # fmt: skip

if TYPE_CHECKING:
    from .callbacks import ChannelSurgeon, CompressedExport, Distillation, SelfCompression, Sparsity24

from .errors import SelfCompressError
from .extras import lazy

_CALLBACKS = dict.fromkeys(
    ("ChannelSurgeon", "CompressedExport", "Distillation", "SelfCompression", "Sparsity24"), ".callbacks"
)


def __getattr__(name: str):
    return lazy(__name__, _CALLBACKS, name)


__all__ = [
    "ChannelGraph",
    "ChannelSurgeon",
    "CompressedExport",
    "Distillation",
    "QuantizationConfig",
    "Rule",
    "SelfCompressError",
    "SelfCompression",
    "SelfCompressor",
    "SizeModel",
    "Sparsity24",
    "Surgeon",
    "attach_quantizers",
    "load_compressed",
    "quantize",
    "register_rule",
]
__version__ = "0.1.0"
