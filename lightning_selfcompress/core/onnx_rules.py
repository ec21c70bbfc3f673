"""TensorRT's rules for explicitly quantized ONNX files, checked on a file before anyone builds an engine from it.

TensorRT 10/11 take INT8 only from QuantizeLinear/DequantizeLinear pairs that are symmetric: zero point 0 of a signed
type, positive finite scales, per-tensor for activations, per-channel only for constant weights and only along axis 0
(the output channels of a Conv / Gemm-with-transB weight). int4 weights pass the same checks here, but TensorRT
takes INT4 only block-wise (blocks of 64 or 128): the export's per-channel int4 files are for ONNX Runtime.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import SelfCompressError

__all__ = ["QuantizationRuleError", "check_explicit_quantization"]

SIGNED = {TensorProto.INT8, TensorProto.INT4}


class QuantizationRuleError(SelfCompressError, ValueError):
    """The file breaks one of TensorRT's explicit-quantization rules."""


def check_explicit_quantization(model: onnx.ModelProto | str | os.PathLike) -> int:
    """Raise `QuantizationRuleError` listing every Q/DQ node that breaks a rule; return how many Q/DQ nodes there are."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    initializers = {i.name: i for i in model.graph.initializer}
    problems, count = [], 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        count += 1
        where = f"{node.op_type} '{node.name}'"
        scale = initializers.get(node.input[1]) if len(node.input) > 1 else None
        zero = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            problems.append(f"{where}: its scale is not a constant initializer")
            continue
        scales = numpy_helper.to_array(scale)
        if not np.all(np.isfinite(scales) & (scales > 0)):
            problems.append(f"{where}: scales must be positive and finite")
        if zero is None:
            problems.append(
                f"{where}: no zero point (the default is uint8; TensorRT needs a signed int8 zero point of 0)"
            )
        elif zero.data_type not in SIGNED or np.any(numpy_helper.to_array(zero).astype(np.int32) != 0):
            problems.append(f"{where}: the zero point must be 0 of a signed type (int8/int4)")
        if scales.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if node.op_type != "DequantizeLinear" or node.input[0] not in initializers:
                problems.append(f"{where}: per-channel scales are allowed only on constant weights")
            elif axis != 0:
                problems.append(f"{where}: per-channel axis is {axis}; TensorRT needs the output channels, axis 0")
    if problems:
        raise QuantizationRuleError("TensorRT's explicit-quantization rules are broken:\n  " + "\n  ".join(problems))
    return count
