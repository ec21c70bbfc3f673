"""Plain PyTorch core: no Lightning import, usable from any training loop."""

from .quant import QuantizationConfig, attach_quantizers, quantize, quantized_layers, quantizer_parameters
from .size import GammaSchedule, SizeModel, SizeReport, float_size_report

__all__ = [
    "GammaSchedule",
    "QuantizationConfig",
    "SizeModel",
    "SizeReport",
    "attach_quantizers",
    "float_size_report",
    "quantize",
    "quantized_layers",
    "quantizer_parameters",
]
