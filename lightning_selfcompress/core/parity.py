"""Does the ONNX file compute what the PyTorch model computes? ONNX Runtime (CPU) is the reference runner."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import SelfCompressError
from ..extras import require

__all__ = ["Parity", "ParityError", "check_parity", "onnx_session", "reference_output"]


class ParityError(SelfCompressError, ValueError):
    """The exported file's outputs differ from the model's by more than the tolerance."""


@dataclass(frozen=True)
class Parity:
    max_abs: float  # max |onnx - torch| over every output element of every batch
    max_rel: float  # max_abs / max |torch|: relative to the output's scale, not per element (logits cross 0)
    tolerance: float | None
    # a model trained with int8 activations: max_rel is the file's graph as the ONNX standard defines each op, this
    # the default session's, whose integer kernels round and requantize in their own arithmetic
    kernels_max_rel: float | None = None


def onnx_session(path: str | os.PathLike, threads: int | None = None, optimized: bool = True):
    """An ONNX Runtime CPU session with the options a user gets by default (and `threads` intra-op threads if given).
    `optimized=False` turns graph optimizations off: each op runs as the ONNX standard defines it, no fused kernels."""
    require("An ONNX Runtime session", "onnxruntime")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not optimized:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def reference_output(model: nn.Module, x: Tensor) -> Tensor:
    """`model(x)` on the model's device in full float32: TF32 off (on CUDA it is on by default for cuDNN convolutions
    and would differ from ONNX Runtime's float32 by about 1e-3). Raises TypeError unless the output is one tensor."""
    device = next(model.parameters(), torch.empty(0)).device
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            output = model(x.to(device))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{type(model).__name__} returns a {type(output).__name__}; export supports a model with one tensor "
            "output. Export a wrapper module that returns the one tensor to deploy (e.g. the logits)."
        )
    return output


@torch.no_grad()
def check_parity(
    path: str | os.PathLike,
    model: nn.Module,
    inputs: Sequence[Tensor],
    tolerance: float | None,
    integer_kernels: bool = False,
) -> Parity:
    """Run `path` in ONNX Runtime and `model` in eval mode on the same `inputs`; raise past `tolerance` (relative).

    `integer_kernels`: the model computes what the file's Q/DQ pairs define (it trained with int8 activations), so
    `tolerance` holds the file's graph run as the ONNX standard defines each op (optimizations off). The default
    session, whose integer kernels round each bias to the int32 grid and requantize in fixed point, arithmetic no
    training simulates, is measured beside it (`kernels_max_rel`): how far the runtime moves the outputs, not a
    property of the file."""
    was_training = model.training
    model.eval()
    try:  # PyTorch's outputs once, whichever sessions they are compared with
        expected = [reference_output(model, x).detach().float().cpu().numpy() for x in inputs]
    finally:
        model.train(was_training)
    arrays = [x.detach().float().cpu().numpy() for x in inputs]
    max_abs, max_rel = _deviation(onnx_session(path, optimized=not integer_kernels), arrays, expected)
    if tolerance is not None and not max_rel <= tolerance:
        raise ParityError(
            f"The ONNX file's outputs differ from the PyTorch model's by {max_rel:.3g} (relative to the largest "
            f"output, max abs {max_abs:.3g}), past the tolerance {tolerance:g}; no file was written. Raise the "
            "tolerance if that is expected (activation quantization costs accuracy), or report the model."
        )
    kernels_rel = _deviation(onnx_session(path), arrays, expected)[1] if integer_kernels else None
    return Parity(max_abs, max_rel, tolerance, kernels_rel)


def _deviation(session, inputs: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> tuple[float, float]:
    """(max |ort - torch|, that relative to max |torch|) over every output of every batch."""
    name = session.get_inputs()[0].name
    max_abs, scale = 0.0, 0.0
    for x, want in zip(inputs, expected):
        got = session.run(None, {name: x})[0]
        if got.shape != want.shape:
            raise ParityError(f"ONNX Runtime returned shape {got.shape}, PyTorch {want.shape}.")
        max_abs = max(max_abs, float(np.abs(got - want).max(initial=0.0)))
        scale = max(scale, float(np.abs(want).max(initial=0.0)))
    return max_abs, max_abs / scale if scale else max_abs
