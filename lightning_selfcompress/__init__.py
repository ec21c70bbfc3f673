"""A network that compresses itself while it trains: learned per-channel bit depths inside a Lightning run."""

from .callbacks import SelfCompression
from .core import QuantizationConfig, SizeModel, attach_quantizers, quantize

__all__ = ["QuantizationConfig", "SelfCompression", "SizeModel", "attach_quantizers", "quantize"]
__version__ = "0.1.0"
