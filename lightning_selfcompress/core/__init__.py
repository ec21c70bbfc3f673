"""Plain PyTorch core: no Lightning import, usable from any training loop. The export (ONNX) is imported on first
use, so training, size accounting and surgery need only PyTorch and NumPy."""

from typing import TYPE_CHECKING

from ..extras import lazy
from .compressor import SelfCompressor
from .distill import Distiller, distillation_loss
from .groups import ChannelGraph, Cuts, GraphError
from .parity import Parity, ParityError, check_parity
from .permute import PermutationReport, permute_for_24
from .quant import QuantizationConfig, attach_quantizers, quantize, quantized_layers, quantizer_parameters
from .rules import Rule, register_rule
from .size import GammaSchedule, LayerShape, SizeModel, SizeReport, float_size_report
from .sparsity import Sparsifier24
from .surgery import Removal, Surgeon, SurgeryRecord, load_compressed, save_compressed

if TYPE_CHECKING:
    from .export import ExportError, ExportResult, export_onnx
    from .onnx_rules import QuantizationRuleError, check_explicit_quantization

_ONNX = {
    "ExportError": ".export",
    "ExportResult": ".export",
    "export_onnx": ".export",
    "QuantizationRuleError": ".onnx_rules",
    "check_explicit_quantization": ".onnx_rules",
}


def __getattr__(name: str):
    return lazy(__name__, _ONNX, name)


__all__ = [
    "Distiller",
    "distillation_loss",
    "ExportError",
    "ExportResult",
    "Parity",
    "ParityError",
    "QuantizationRuleError",
    "check_explicit_quantization",
    "check_parity",
    "export_onnx",
    "ChannelGraph",
    "Cuts",
    "GammaSchedule",
    "GraphError",
    "LayerShape",
    "Removal",
    "Surgeon",
    "SurgeryRecord",
    "load_compressed",
    "save_compressed",
    "PermutationReport",
    "permute_for_24",
    "QuantizationConfig",
    "Rule",
    "SelfCompressor",
    "SizeModel",
    "SizeReport",
    "Sparsifier24",
    "attach_quantizers",
    "float_size_report",
    "quantize",
    "quantized_layers",
    "quantizer_parameters",
    "register_rule",
]
