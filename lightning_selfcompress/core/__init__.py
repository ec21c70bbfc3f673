"""Plain PyTorch core: no Lightning import, usable from any training loop."""

from .groups import ChannelGraph, GraphError
from .permute import PermutationReport, permute_for_24
from .quant import QuantizationConfig, attach_quantizers, quantize, quantized_layers, quantizer_parameters
from .size import GammaSchedule, SizeModel, SizeReport, float_size_report
from .surgery import Removal, Surgeon, SurgeryRecord, load_compressed

__all__ = [
    "ChannelGraph",
    "GammaSchedule",
    "GraphError",
    "Removal",
    "Surgeon",
    "SurgeryRecord",
    "load_compressed",
    "PermutationReport",
    "permute_for_24",
    "QuantizationConfig",
    "SizeModel",
    "SizeReport",
    "attach_quantizers",
    "float_size_report",
    "quantize",
    "quantized_layers",
    "quantizer_parameters",
]
