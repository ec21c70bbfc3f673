"""Does the ONNX file compute what the PyTorch model computes? ONNX Runtime (CPU) is the reference runner."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import SelfCompressError
from ..extras import require

__all__ = ["Parity", "ParityError", "check_parity", "onnx_session", "reference_output"]


# A model trained with int8 activations: the share of one layer's int8 input codes that may differ from PyTorch's.
# Float summation order moved at most 0.74% of a layer's codes, by 2 levels at most (ResNet-9's int8 and uint8 steps,
# 3 seeds each, and the main job's, 2 test batches), while a step 19% off moves most of them
CODES_TOLERANCE = 2e-2


# A model trained with int8 activations whose steps could not be compared: its file's free run, as the standard defines
# each op, is held to at least this. A convolution summing in another order now and then moves a value across a
# rounding boundary of the next Q/DQ pair, one level, and the moves compound with depth: ResNet-9 at 0.39 bits per
# weight, 14 of 1.6 M activations moved after its first layer and 0.5% before its last convolution, none by more than
# 2 levels, the logits 0.4-1.7% (the main job's 0.1-0.2%; Inception-v3 two SGD steps in, 7.8%, its codes 0.13% at
# most). Where the steps are compared, the outputs computed from the file's codes are held to the tolerance itself:
# at most 1.5e-6 over the 63 torchvision classifiers up to 100 M parameters two steps in, both layouts
FREE_RUN_TOLERANCE = 5e-2


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
    # and layer by layer: the largest share of one layer's int8 input codes that differ between the graph and PyTorch,
    # and by how many levels at most (`check_parity`'s `steps`)
    codes_changed: float | None = None
    codes_max_levels: int | None = None
    # and the outputs again, every compared step's values taken from the file as PyTorch runs: what the file computes
    # after its steps, without the level moves that compound along a free run; where measured, `tolerance` holds it
    forced_max_rel: float | None = None


def onnx_session(path: str | os.PathLike | bytes, threads: int | None = None, optimized: bool = True):
    """An ONNX Runtime CPU session with the options a user gets by default (and `threads` intra-op threads if given).
    `optimized=False` turns graph optimizations off: each op runs as the ONNX standard defines it, no fused kernels.
    `path` may be a serialized model."""
    require("An ONNX Runtime session", "onnxruntime")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not optimized:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = path if isinstance(path, bytes) else str(path)
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


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
    steps: Mapping[str, tuple[nn.Module, str]] | None = None,
) -> Parity:
    """Run `path` in ONNX Runtime and `model` in eval mode on the same `inputs`; raise past `tolerance` (relative).

    `integer_kernels`: the model computes what the file's Q/DQ pairs define (it trained with int8 activations), so
    the file's graph is run as the ONNX standard defines each op (optimizations off). The default session, whose
    integer kernels round each bias to the int32 grid and requantize in fixed point, arithmetic no training
    simulates, is measured beside it (`kernels_max_rel`): how far the runtime moves the outputs, not a property of the
    file. `steps` (a layer's module name in `model` -> (its `ActivationQuantizer`, the file's QuantizeLinear output it
    becomes)): the trained steps' int8 codes are compared too, layer by layer (`_compare_codes`), at most
    `CODES_TOLERANCE` of one layer's moved (where `tolerance` is not None), and `tolerance` then holds the outputs
    computed from the file's codes (`forced_max_rel`): the codes check each step, this what follows the last, and
    the free run's outputs (`max_rel`), where level moves compound with depth, are reported beside them (judged,
    at least `FREE_RUN_TOLERANCE`, only where no step was compared)."""
    was_training = model.training
    model.eval()
    try:
        return _check_parity(path, model, inputs, tolerance, integer_kernels, steps or {})
    finally:
        model.train(was_training)


def _check_parity(path, model, inputs, tolerance, integer_kernels, steps) -> Parity:
    # layers sharing a step and the file's tensor of its codes (`share_input_steps`): compared once, named by them
    # all; those reading the tensor through a max pool have a tensor of their own
    groups: dict[tuple[int, str], list[str]] = {}
    for name, (quantizer, tensor) in steps.items():
        groups.setdefault((id(quantizer), tensor), []).append(name)
    calls = Counter()
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
        for name in steps
    ]
    try:  # PyTorch's outputs once, whichever sessions they are compared with
        expected = [reference_output(model, x).detach().float().cpu().numpy() for x in inputs]
    finally:
        for handle in handles:
            handle.remove()
    arrays = [x.detach().float().cpu().numpy() for x in inputs]
    max_abs, max_rel = _deviation(onnx_session(path, optimized=not integer_kernels), arrays, expected)
    kernels_rel = _deviation(onnx_session(path), arrays, expected)[1] if integer_kernels else None
    codes_tolerance = None if tolerance is None else CODES_TOLERANCE
    # a layer run twice per forward: its codes would not line up with the file's one tensor; not compared
    once = {
        ", ".join(names): (*steps[names[0]], [model.get_submodule(n) for n in names])
        for names in groups.values()
        if all(calls[n] == len(inputs) for n in names)
    }
    changed, levels, forced_rel = _compare_codes(path, model, inputs, once, codes_tolerance) if once else (None,) * 3
    judged, how = (max_rel, "") if forced_rel is None else (forced_rel, ", PyTorch computing from the file's codes")
    if tolerance is not None and integer_kernels and forced_rel is None:
        tolerance = max(tolerance, FREE_RUN_TOLERANCE)
    if tolerance is not None and not judged <= tolerance:
        raise ParityError(
            f"The ONNX file's outputs differ from the PyTorch model's by {judged:.3g} (relative to the largest "
            f"output{how}), past the tolerance {tolerance:g}; no file was written. Raise the tolerance if that is "
            "expected (activation quantization costs accuracy), or report the model."
        )
    return Parity(max_abs, max_rel, tolerance, kernels_rel, changed, levels, forced_rel)


def _deviation(session, inputs: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> tuple[float, float]:
    """(max |ort - torch|, that relative to max |torch|) over every output of every batch."""
    name = session.get_inputs()[0].name
    pairs = []
    for x, want in zip(inputs, expected):
        got = session.run(None, {name: x})[0]
        if got.shape != want.shape:
            raise ParityError(f"ONNX Runtime returned shape {got.shape}, PyTorch {want.shape}.")
        pairs.append((got, want))
    return _largest_difference(pairs)


def _largest_difference(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(max |got - want|, that relative to max |want|) over every (got, want) pair."""
    max_abs = max((float(np.abs(got - want).max(initial=0.0)) for got, want in pairs), default=0.0)
    scale = max((float(np.abs(want).max(initial=0.0)) for _, want in pairs), default=0.0)
    return max_abs, max_abs / scale if scale else max_abs


def _compare_codes(
    path: str | os.PathLike,
    model: nn.Module,
    inputs: Sequence[Tensor],
    steps: Mapping[str, tuple[nn.Module, str, list[nn.Module]]],
    tolerance: float | None,
) -> tuple[float, int, float]:
    """Each trained step's codes in the file (its QuantizeLinear output less its zero point, the graph as the ONNX
    standard defines each op) against PyTorch's, layer by layer, each computed by PyTorch from the file's codes
    upstream (every step's output replaced by the file's values as the model runs): a layer's codes then differ only
    by what happens between the steps before it and its own, and a wrong step is named where it is, not downstream. A
    float summation order other than PyTorch's moves a code by a level where a value sits on a rounding boundary, and
    compared along the whole model such moves compound (one level in 0.5% of the codes early in a ResNet-50 trained
    two steps moved 20-45% of the deep layers' codes, in PyTorch alone); a wrong step, zero point or missing ReLU
    moves most of one layer's codes. Raises past `tolerance` (the share of one layer's codes that may differ, the
    layer named; None: measure only); returns the largest share, the largest move in levels, and how far the file's
    outputs are from those PyTorch computes so (relative to the largest)."""
    import onnx
    from onnx import helper, numpy_helper

    onnx_model = onnx.load(str(path))
    initializers = {i.name: i for i in onnx_model.graph.initializer}
    quantizing = {n.output[0]: n for n in onnx_model.graph.node if n.op_type == "QuantizeLinear"}
    scales, zero_points = ({name: numpy_helper.to_array(initializers[quantizing[tensor].input[k]]).item()
                            for name, (_, tensor, _) in steps.items()} for k in (1, 2))  # fmt: skip
    onnx_model.graph.output.extend(
        helper.make_tensor_value_info(tensor, initializers[quantizing[tensor].input[2]].data_type, None)
        for _, tensor, _ in steps.values()
    )
    session = onnx_session(onnx_model.SerializeToString(), optimized=False)
    reading: dict[int, str] = {}  # a quantizer -> the step it runs as, set while one of its compared layers runs

    def force(file_codes: dict, torch_codes: dict):
        def hook(quantizer: nn.Module, args, output: Tensor) -> Tensor | None:
            name = reading.get(id(quantizer))
            if name is None:
                return None
            shift = quantizer.shift_of(output)  # a step quantizing around a folded BatchNorm's shift: the file's less it
            torch_codes[name] = torch.round((output - shift).float() / quantizer.scale).cpu().numpy().astype(np.int32)
            return torch.from_numpy(file_codes[name]).to(output) * scales[name] + shift  # the file's values

        return hook

    changed, levels, outputs = {}, {}, []
    tensors, input_name = [tensor for _, tensor, _ in steps.values()], session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    quantizers = list({id(q): q for q, _, _ in steps.values()}.values())
    for x in inputs:
        got, *run = session.run([output_name, *tensors], {input_name: x.detach().float().cpu().numpy()})
        file_codes = {name: codes.astype(np.int32) - zero_points[name] for name, codes in zip(steps, run)}
        torch_codes: dict[str, np.ndarray] = {}
        handles = [q.register_forward_hook(force(file_codes, torch_codes)) for q in quantizers]
        for name, (q, _, layers) in steps.items():
            for layer in layers:
                handles.append(layer.register_forward_pre_hook(lambda *_, q=q, n=name: reading.update({id(q): n})))
                handles.append(layer.register_forward_hook(lambda *_, q=q: reading.update({id(q): None})))
        try:
            want = reference_output(model, x).detach().float().cpu().numpy()
        finally:
            for handle in handles:
                handle.remove()
        outputs.append((got, want))
        for name in steps:
            moved = np.abs(file_codes[name] - torch_codes[name])
            changed[name] = max(changed.get(name, 0.0), float((moved > 0).mean()))
            levels[name] = max(levels.get(name, 0), int(moved.max(initial=0)))
    worst = max(changed, key=changed.get)
    if tolerance is not None and changed[worst] > tolerance:
        raise ParityError(
            f"{changed[worst]:.2%} of the int8 input codes of {worst} differ between the ONNX file and PyTorch (by up "
            f"to {levels[worst]} levels), past {tolerance:.0%}: the file's step or zero point for that layer is not "
            "the trained one. No file was written; report the model."
        )
    return changed[worst], max(levels.values()), _largest_difference(outputs)[1]
