"""ONNX export of a self-compressed network, with each quantized layer's weight stored as the integers it trained with.

The quantizer computes q = 2^e round(clamp(2^-e w, -2^(b-1), 2^(b-1)-1)) per output channel. The rounded values are
integers; with b <= 8 they fit int8, and one float32 product per weight, integers times 2^e, gives back q bit for bit.
How it is built:

1. The legacy TorchScript exporter (`dynamo=False`) writes the network with each quantized layer swapped, for the
   duration of the export, back to its float class holding the dequantized weight q. BatchNorm is not folded into
   the preceding convolution (that would scale q off its integer grid).
2. The graph is rewritten: each Conv/Gemm weight initializer that equals a quantized layer's q (matched by value,
   the exporter's name preferred; a MatMul's [in, out] initializer, a Linear on a 3-D input, through a Transpose)
   becomes an int8 (or int4) initializer and that product, in one of two forms:
   - weight-only (no activation quantization): `Mul(Cast(integers, float), scale)`. Every runtime folds this constant
     subgraph into a float weight once, at load, so the file runs at the float network's speed in a default ONNX
     Runtime session. (A `DequantizeLinear` would not be folded there: ONNX Runtime keeps it for its int8 fusions and
     dequantizes on every call, 1.5x slower than float on the main job's network.)
   - with activation quantization: `DequantizeLinear(integers, scale, zero_point=0, axis=0)` on the weight and a
     per-tensor int8 Q/DQ pair on the layer's input, the pattern from which TensorRT and ONNX Runtime pick int8
     kernels. Bias stays float.
3. BatchNorm is folded into the scale beside the integers and into the biases where that is exact (`onnx_fold`), and
   so is each residual branch's re-embedding (the branch's last convolution writes zeros where it has no channel).
4. With activation quantization, each quantized layer's input gets a Q/DQ pair with its trained step (a layer with
   an `input_quantizer`) or one calibrated on a few batches (max |x| / 127), and its output the next layer's pair
   where only ops that commute with rounding lie between, so that ONNX Runtime fuses an integer kernel. Laid out for
   TensorRT (symmetric int8) by default, or for ONNX Runtime (`runtime="onnxruntime"`: uint8, a ReLU's output over
   the whole range, zero point 0, which ONNX Runtime fuses into the kernel before it; first layers on images left
   float). A residual Add that feeds a quantized layer gets Q/DQ on both inputs, so that it runs in int8 too: with
   the steps they trained with (`residual_steps`; the export's trace marks those tensors) or calibrated.

A layer whose integers do not all fit int8 (a channel above 8 bits) stays float32 as a whole, holding q exactly, and
is reported so; so does a layer whose scale 2^e is not a positive normal float32. Optional: int4 storage (opset 21)
for layers whose integers all fit [-8, 7].

The file is written to a temporary name, checked (onnx.checker, TensorRT's explicit-quantization rules, parity with
PyTorch in ONNX Runtime) and only then renamed into place: a failed export leaves no file behind (nor the optional
float copy, written only once the checks pass).

int4 files are for ONNX Runtime: TensorRT's INT4 is weight-only and block-wise (blocks of 64 or 128 input channels),
not per output channel as written here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from ..errors import SelfCompressError
from .atomic import atomic_path
from .checks import check_choice
from .inputs import describe
from .onnx_fold import (
    dequantized_weight,
    fold_batchnorm,
    fold_output_scales,
    fold_reembeddings,
    producers_of,
    readers_of,
    shape_only,
)
from .onnx_rules import check_explicit_quantization
from .parity import Parity, check_parity
from .quant import (
    FEW_INPUT_CHANNELS,
    QUANTIZED_CLASS,
    RUNTIMES,
    input_steps,
    integer_bits,
    integer_weights,
    quantized_layers,
)
from .residual_steps import MARK_DOMAIN, MARK_OP, has_residual_steps, marking_steps

__all__ = ["ExportError", "ExportResult", "LayerExport", "export_onnx", "inference_form", "integer_weights",
           "stored_weight_bits", "stored_weights"]

FLOAT_CLASS = {quantized: plain for plain, quantized in QUANTIZED_CLASS.items()}
INT_RANGES = {"int8": (-128, 127), "int4": (-8, 7)}
NUMPY_TYPE = {"int8": np.int8, "int4": ml_dtypes.int4}  # onnx packs int4 two to a byte
WEIGHT_OPS = ("Conv", "Gemm")
# f(q(x)) = q(f(x)) for a per-tensor q: ops that only move, select or take the max of elements (a branch's
# re-embedding is Concat with zeros, then Gather), and ReLU
COMMUTES_WITH_ROUNDING = ("Relu", "MaxPool", "Reshape", "Flatten", "Concat", "Gather")
MAX_POOL_OPS = ("MaxPool", "GlobalMaxPool")  # pooling a quantized tensor: its values, on its grid
# a ReLU's output stays non-negative through these
KEEPS_SIGN = ("MaxPool", "AveragePool", "GlobalAveragePool", "Reshape", "Flatten", "Gather")
OPSET = 20  # the legacy exporter's highest; int4 storage converts the file to 21


class ExportError(SelfCompressError, RuntimeError):
    """The model could not be exported, or the file could not be written."""


@dataclass(frozen=True)
class LayerExport:
    name: str
    storage: str  # "int8", "int4" or "float"
    channels: int
    weights: int
    max_bits: float  # the largest bit depth of an alive channel (0 when all are dead)
    reason: str | None = None  # why a quantized layer stays float
    nodes: tuple[str, ...] = ()  # its Conv/Gemm nodes in the file


@dataclass
class ExportResult:
    path: Path
    layers: list[LayerExport]
    file_bytes: int
    float_file_bytes: int  # the same network exported with float32 weights
    weight_bits: int  # whole bits per channel that the file's integer weights need (`stored_weight_bits`)
    parity: Parity | None
    activation_scales: dict[str, float] = field(default_factory=dict)  # input tensor -> int8 step (trained/calibrated)
    folded_batchnorm: list[str] = field(default_factory=list)  # BatchNorm nodes folded into scales and biases

    def to_dict(self) -> dict:
        """As JSON-ready data, for the export report."""
        return {
            "path": str(self.path),
            "file_bytes": self.file_bytes,
            "float_file_bytes": self.float_file_bytes,
            "weight_bits": self.weight_bits,
            "parity": asdict(self.parity) if self.parity else None,
            "activation_quantized": bool(self.activation_scales),
            "folded_batchnorm": self.folded_batchnorm,
            "layers": [asdict(layer) for layer in self.layers],
        }


def stored_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Dequantized weight tensor -> (its integers, the per-output-channel scale) for every integer weight the file
    stores, in either form the export writes (`onnx_fold.dequantized_weight`)."""
    initializers = {i.name: i for i in model.graph.initializer}
    producer = producers_of(model.graph)
    found = {}
    for node in model.graph.node:
        if (stored := dequantized_weight(node, producer, initializers)) is not None:
            integers, scale = (numpy_helper.to_array(initializers[name]) for name in stored)
            found[node.output[0]] = integers.astype(np.int32), scale.reshape(-1)
    return found


def stored_weight_bits(model: onnx.ModelProto) -> int:
    """The bits of the file's integer weights packed at whole bits per output channel: each channel's `integer_bits`
    times its element count. This is what `SizeReport.deployable_bits` predicts for the thinned network; ONNX itself
    stores them as int8 or int4."""
    total = 0
    for ints, _ in stored_weights(model).values():
        integers = torch.from_numpy(ints).float()
        total += int((integer_bits(integers) * integers[0].numel()).sum())
    return total


@contextlib.contextmanager
def inference_form(model: nn.Module) -> Iterator[dict[str, np.ndarray]]:
    """For the duration, every quantized layer is its float class holding its quantized weight (yielded by name), and
    every Linear without a bias has a zero bias, so that it exports as Gemm(transB=1) with its [out, in] weight
    rather than as x @ W^T with a transposed copy."""
    layers = quantized_layers(model)
    saved = []  # (module, class, weight, bias)
    weights = {}
    try:
        for name, module in model.named_modules():
            if name not in layers and not (isinstance(module, nn.Linear) and module.bias is None):
                continue
            saved.append((module, module.__class__, module._parameters["weight"], module._parameters.get("bias")))
            if name in layers:
                with torch.no_grad():
                    q = module.weight_quantizer(module.weight).detach().float()
                module.__class__ = FLOAT_CLASS[module.__class__]
                module._parameters["weight"] = nn.Parameter(q, requires_grad=False)
                weights[name] = q.cpu().numpy()
            if isinstance(module, nn.Linear) and module.bias is None:
                module._parameters["bias"] = nn.Parameter(
                    module.weight.new_zeros(module.weight.shape[0]), requires_grad=False
                )
        yield weights
    finally:
        for module, cls, weight, bias in saved:
            module.__class__ = cls
            module._parameters["weight"] = weight
            module._parameters["bias"] = bias


def _trained_input(layer: nn.Module) -> bool:
    """Whether `layer` trained with int8 inputs: an `input_quantizer` whose step a training batch has started."""
    quantizer = layer._modules.get("input_quantizer")
    return quantizer is not None and bool(quantizer.initialized)


def uint8_steps(model: nn.Module) -> list[str]:
    """The layers whose int8 inputs train (or trained) on the uint8 grid (`activation_runtime="onnxruntime"`)."""
    return sorted(n for n, q in input_steps(model).items() if q.unsigned or (q.may_be_unsigned and not q.initialized))


def check_runtime_fits(model: nn.Module, runtime: str) -> None:
    """Such steps cannot be laid out for TensorRT, which takes symmetric int8 only: said before training as well as
    at export."""
    check_choice("runtime", runtime, RUNTIMES)
    if runtime == "tensorrt" and (uint8 := uint8_steps(model)):
        raise ExportError(
            f"{len(uint8)} layer(s) train their int8 inputs for ONNX Runtime, on the uint8 grid "
            f"(activation_runtime='onnxruntime'): {uint8[:3]}. TensorRT takes symmetric int8 only: export with "
            "runtime='onnxruntime', or train with activation_runtime='tensorrt' for an engine."
        )


def _check_model(model: nn.Module) -> None:
    odd = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if odd:
        raise ExportError(f"{type(model).__name__} has {odd} parameters; export a float32 model (call model.float()).")


def _export_float(model: nn.Module, example: Tensor, path: Path, marked: bool = False) -> None:
    was_training = model.training
    model.eval()
    try:
        # grad mode on: under no_grad, nn.MultiheadAttention takes a fused fast path that ONNX has no operator for
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=OPSET,
                custom_opsets={MARK_DOMAIN: 1} if marked else None,  # residual Adds' steps (`residual_steps`)
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                training=torch.onnx.TrainingMode.PRESERVE,  # EVAL would fold BatchNorm into the convolution's weight
            )
    except Exception as error:
        first_line = next(iter(str(error).splitlines()), "")  # the rest is the exporter's dump of the whole graph
        raise ExportError(
            f"torch.onnx.export (TorchScript exporter) could not export {type(model).__name__} on the example input "
            f"({describe(example)}): {type(error).__name__}: {first_line}. If forward takes something else than "
            "that tensor, give it the image batch alone; else replace the operation the error names with one ONNX "
            "supports, or leave that part out of the exported module."
        ) from error
    finally:
        model.train(was_training)


def _weight_initializer(node: onnx.NodeProto, initializers: dict) -> str | None:
    """The name of the node's weight initializer, or None (a computed weight): [out, in, *kernel] for Conv and
    Gemm(transB=1); [in, out] for MatMul, as the exporter writes a Linear applied to a 3-D input."""
    if node.op_type not in (*WEIGHT_OPS, "MatMul") or len(node.input) < 2 or node.input[1] not in initializers:
        return None
    if node.op_type == "Gemm" and not next((a.i for a in node.attribute if a.name == "transB"), 0):
        return None  # x @ W with W as [in, out]: per-output-channel would be axis 1, which we do not write
    if node.op_type == "MatMul" and len(initializers[node.input[1]].dims) != 2:
        return None
    return node.input[1]


def _match_layers(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> dict[str, list[onnx.NodeProto]]:
    """Quantized layer -> the Conv/Gemm nodes whose weight initializer equals its quantized weight, bit for bit.

    The exporter's name (`<layer>.weight`) is preferred; otherwise the value decides (the exporter may rename, and
    dedups equal initializers). Two layers with identical weights are interchangeable here: either's integers and
    scales dequantize to the same floats.
    """
    initializers = {i.name: i for i in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}
    matches: dict[str, list[onnx.NodeProto]] = {name: [] for name in weights}
    by_print: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        by_print.setdefault(_fingerprint(w), []).append(name)
    for node in model.graph.node:
        init = _weight_initializer(node, initializers)
        if init is None:
            continue
        array = arrays.setdefault(init, numpy_helper.to_array(initializers[init]))
        if node.op_type == "MatMul":
            array = array.T  # compared as the layer's [out, in]
        named = init.removesuffix(".weight")
        if named in weights and weights[named].shape == array.shape and np.array_equal(weights[named], array):
            matches[named].append(node)
            continue
        same = [n for n in by_print.get(_fingerprint(array), []) if np.array_equal(weights[n], array)]
        if same:
            unclaimed = [n for n in same if not matches[n]]
            matches[(unclaimed or same)[0]].append(node)
    return matches


def _fingerprint(array: np.ndarray) -> tuple:
    """The shape and a few values: which weights can be equal at all (comparing every pair whole is quadratic)."""
    picks = np.unravel_index(np.arange(0, array.size, max(1, array.size // 16)), array.shape)
    return array.shape, array[picks].tobytes()  # no copy of a transposed weight


def _storage(integers: Tensor, scale: Tensor, bits: Tensor, int4: bool) -> tuple[str, str | None]:
    alive = bits > 0
    live_scale = scale[alive]
    if not bool(torch.all(torch.isfinite(live_scale) & (live_scale >= torch.finfo(torch.float32).tiny))):
        return "float", "a scale 2^e is not a positive normal float32"
    lo, hi = float(integers.min()), float(integers.max())
    for storage in ("int4", "int8") if int4 else ("int8",):
        if INT_RANGES[storage][0] <= lo and hi <= INT_RANGES[storage][1]:
            return storage, None
    wide = int(((integers.flatten(1).amin(1) < -128) | (integers.flatten(1).amax(1) > 127)).sum())
    return "float", f"{wide} channel(s) need more than 8 bits: the whole layer stays float32 (exact)"


def _dequantize(name: str, storage: str, scale: Tensor, stored: str, output: str, as_qdq: bool) -> tuple[list, list]:
    """(initializers, nodes) computing `output` = integers * scale per output channel from the initializer `stored`."""
    as_type = NUMPY_TYPE[storage]
    if as_qdq:  # the form runtimes fuse into int8 kernels, once the input is quantized too
        initializers = [
            numpy_helper.from_array(scale.numpy().astype(np.float32), f"{name}.weight_scale"),
            numpy_helper.from_array(np.zeros(scale.numel(), as_type), f"{name}.weight_zero_point"),
        ]
        inputs = [stored, f"{name}.weight_scale", f"{name}.weight_zero_point"]
        return initializers, [helper.make_node("DequantizeLinear", inputs, [output], name=f"{name}.dequantize", axis=0)]
    return [numpy_helper.from_array(scale.numpy().astype(np.float32), f"{name}.weight_scale")], [
        helper.make_node("Cast", [stored], [f"{name}.weight_cast"], name=f"{name}.cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{name}.weight_cast", f"{name}.weight_scale"], [output], name=f"{name}.dequantize"),
    ]


def _rewrite_weights(
    model: onnx.ModelProto, layers: dict[str, nn.Module], weights: dict[str, np.ndarray], int4: bool, qdq: set[str]
) -> tuple[list[LayerExport], dict[str, list[onnx.NodeProto]]]:
    """Integer weights in place of the float ones; those of the layers in `qdq` behind a DequantizeLinear (their input
    will be quantized too), the others behind Mul(Cast). Returns the reports and each layer's Conv/Gemm nodes."""
    graph = model.graph
    matches = _match_layers(model, weights)
    new_nodes, reports = [], []
    for name, module in layers.items():
        integers, scale = integer_weights(module)
        bits = module.weight_quantizer.bits.detach().float().cpu()
        integers, scale = integers.cpu(), scale.cpu()
        alive_bits = bits[bits > 0]
        max_bits = float(alive_bits.max()) if alive_bits.numel() else 0.0
        storage, reason = _storage(integers, scale, bits, int4)
        if not matches[name]:
            storage, reason = "float", "its weight is not a Conv/Gemm/MatMul weight initializer of the ONNX graph"
        nodes = tuple(node.name for node in matches[name])
        reports.append(LayerExport(name, storage, int(integers.shape[0]), integers.numel(), max_bits, reason, nodes))
        if storage == "float":
            continue
        scale = torch.where(bits > 0, scale, torch.ones_like(scale))  # a dead channel's integers are 0: any scale
        transposed = any(node.op_type == "MatMul" for node in matches[name])
        as_qdq = name in qdq and not transposed  # a MatMul's int8 kernel would need its scales on axis 1
        if not as_qdq:
            scale = scale.view((-1,) + (1,) * (integers.dim() - 1))  # broadcast over each channel's weights
        stored, dequantized = f"{name}.weight_{storage}", f"{name}.weight_dequantized"
        graph.initializer.append(numpy_helper.from_array(integers.numpy().astype(np.int8).astype(NUMPY_TYPE[storage]),
                                                         stored))  # fmt: skip
        initializers, nodes = _dequantize(name, storage, scale, stored, dequantized, as_qdq)
        graph.initializer.extend(initializers)
        new_nodes.extend(nodes)
        if transposed:  # [out, in] as stored and counted; the MatMul reads [in, out], folded at load like the rest
            new_nodes.append(helper.make_node("Transpose", [dequantized], [f"{name}.weight_transposed"],
                                              name=f"{name}.transpose", perm=[1, 0]))  # fmt: skip
        for node in matches[name]:
            node.input[1] = f"{name}.weight_transposed" if node.op_type == "MatMul" else dequantized
    nodes = new_nodes + list(graph.node)  # their inputs are initializers: first is a valid topological order
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return reports, matches


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for node in graph.node for i in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _calibrate(model: onnx.ModelProto, tensors: list[str], batches: Iterable[Tensor]) -> dict[str, float]:
    """max |x| of each named tensor over the calibration batches, run in ONNX Runtime."""
    import onnxruntime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    absmax = dict.fromkeys(tensors, 0.0)
    seen = 0
    for batch in batches:
        outputs = session.run(None, {"input": batch.detach().float().cpu().numpy()})
        for t, value in zip(tensors, outputs):
            absmax[t] = max(absmax[t], float(np.abs(value).max(initial=0.0)))
        seen += 1
    if not seen:
        raise ValueError("activation quantization needs at least one calibration batch; none was given.")
    return absmax


def _insert_qdq(graph: onnx.GraphProto, tensor: str, readers: list[onnx.NodeProto], args: list[str], name: str) -> None:
    """Q/DQ on `tensor` (scale and zero point `args`) for `readers`, right after the node that makes it: one Q, and a
    DQ of each reader's own (ONNX Runtime fuses a DQ into an integer kernel only where it is the DQ's sole reader)."""
    nodes = [helper.make_node("QuantizeLinear", [tensor, *args], [f"{name}.quantized"], name=f"{name}.quantize")]
    for k, reader in enumerate(readers):
        suffix = f".{k}" if k else ""
        nodes.append(helper.make_node("DequantizeLinear", [f"{name}.quantized", *args], [f"{name}.dequantized{suffix}"],
                                      name=f"{name}.dequantize{suffix}"))  # fmt: skip
        reader.input[:] = [f"{name}.dequantized{suffix}" if i == tensor else i for i in reader.input]
    position = next((k + 1 for k, node in enumerate(graph.node) if tensor in node.output), 0)
    for node in reversed(nodes):
        graph.node.insert(position, node)


def _quantize_outputs(graph: onnx.GraphProto, layers: list[onnx.NodeProto]) -> None:
    """Q/DQ on each quantized layer's (or residual Add's) output where it reaches the next layer's input Q only through
    ops that commute with its rounding (ReLU, MaxPool, reshapes; with its type's least zero point the pair does the
    ReLU itself): with that Q's scale and zero point, the added rounding changes no value, and ONNX Runtime fuses
    DQ -> Conv -> Q into one integer kernel (QLinearConv; QLinearAdd for an Add)."""
    reading = readers_of(graph)
    outputs = {o.name for o in graph.output}

    def sole_reader(tensor: str) -> onnx.NodeProto | None:
        """The one node that reads `tensor`'s values, as its data (every input of a Concat is)."""
        values = [n for n in reading[tensor] if not shape_only(n, reading)]
        if len(values) != 1 or tensor in outputs:
            return None
        return values[0] if values[0].input[0] == tensor or values[0].op_type == "Concat" else None

    for layer in layers:
        tensor = layer.output[0]
        node = sole_reader(tensor)
        while node is not None and node.op_type in COMMUTES_WITH_ROUNDING:
            tensor = node.output[0]
            node = sole_reader(tensor)
        if node is not None and node.op_type == "QuantizeLinear" and tensor != layer.output[0]:
            _insert_qdq(graph, layer.output[0], [sole_reader(layer.output[0])], list(node.input[1:]),
                        f"{layer.name}.output")  # fmt: skip


def _pool_quantized_inputs(graph: onnx.GraphProto) -> None:
    """A max pool whose output only a QuantizeLinear reads, with the scale and zero point of one on the pool's input
    (layers that read a tensor and its pooling share a step: `quant.share_input_steps`), pools that Q's values
    instead: the maxima of rounded values are the rounded maxima, so no value changes, the input is quantized once
    (its maker's output quantization fuses: QLinearConv) and the runtimes pool in int8."""
    reading, producer, outputs = readers_of(graph), producers_of(graph), {o.name for o in graph.output}
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.startswith("act")}

    def same_step(a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
        arrays = [values.get(name) for name in (*a.input[1:3], *b.input[1:3])]
        return len(arrays) == 4 and all(
            x is not None and x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(arrays[:2], arrays[2:])
        )

    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        pool = producer.get(q.input[0])
        if pool is None or pool.op_type not in MAX_POOL_OPS or len(pool.output) > 1:
            continue
        if q.input[0] in outputs or [n for n in reading[q.input[0]] if not shape_only(n, reading)] != [q]:
            continue
        source = next((n for n in reading[pool.input[0]] if n.op_type == "QuantizeLinear" and same_step(n, q)), None)
        if source is not None:
            dq = helper.make_node("DequantizeLinear", [source.output[0], *source.input[1:]], [f"{pool.name}.input"],
                                  name=f"{pool.name}.dequantize")  # fmt: skip
            pool.input[0] = dq.output[0]
            graph.node.insert(list(graph.node).index(pool), dq)


def _non_negative(producer: dict[str, onnx.NodeProto], tensor: str) -> bool:
    """Whether `tensor` is a ReLU's output, through pooling, reshapes and gathers, or a sum or concatenation of
    such (and of zeros)."""
    node = producer.get(tensor)
    while node is not None and node.op_type in KEEPS_SIGN:
        node = producer.get(node.input[0])
    if node is not None and node.op_type in ("Add", "Concat"):
        return all(_non_negative(producer, t) for t in node.input)
    if node is not None and node.op_type == "ConstantOfShape":  # a re-embedding's zeros (the default value)
        return all(numpy_helper.to_array(a.t).min() >= 0 for a in node.attribute if a.name == "value")
    return node is not None and node.op_type == "Relu"


def _take_marks(model: onnx.ModelProto) -> list[tuple[str, list[onnx.NodeProto], tuple[float, bool]]]:
    """Remove the export's `lsc::Step` markers (a residual Add's input trained with a step: `residual_steps`), their
    readers reading the marked tensor again. Returns, per marker, (the tensor, its readers, (scale, unsigned grid))."""
    graph, reading = model.graph, readers_of(model.graph)
    marks = []
    for marker in [n for n in graph.node if n.domain == MARK_DOMAIN and n.op_type == MARK_OP]:
        readers = reading[marker.output[0]]
        for reader in readers:
            reader.input[:] = [marker.input[0] if i == marker.output[0] else i for i in reader.input]
        attributes = {a.name: helper.get_attribute_value(a) for a in marker.attribute}
        marks.append((marker.input[0], readers, (attributes["scale"], bool(attributes["unsigned"]))))
        graph.node.remove(marker)
    kept = [o for o in model.opset_import if o.domain != MARK_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return marks


def _residual_adds(producer: dict[str, onnx.NodeProto], tensors: Iterable[str], constants: set[str]) -> list:
    """The Adds of two computed tensors whose sum (through a ReLU, pooling or reshapes) is one of `tensors`."""
    found = []
    for tensor in tensors:
        node = producer.get(tensor)
        while node is not None and node.op_type in ("Relu", *KEEPS_SIGN):
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "Add" and not constants & set(node.input) and node not in found:
            found.append(node)
    return found


def _quantize_activations(
    model: onnx.ModelProto,
    layers: list[onnx.NodeProto],
    trained: dict[str, tuple[float, bool]],
    marks: list[tuple[str, list[onnx.NodeProto], tuple[float, bool]]],
    batches: Iterable[Tensor] | None,
    runtime: str,
) -> dict[str, float]:
    """Per-tensor int8 Q/DQ on the input of each of `layers`: with its trained step where `trained` (node name ->
    (scale, on the unsigned grid)) has one, else calibrated on `batches`; on each marked tensor for all its readers
    (`marks`: a residual Add's inputs trained with steps, `_take_marks`); and on a layer's (or such an Add's) output
    where that is exact (`_quantize_outputs`).
    Symmetric int8 (max |x| / 127, zero point 0) for TensorRT. For ONNX Runtime uint8, the type its x86 integer
    kernels take (else it converts each pair, and a tensor read by two layers then stays float): zero point 128,
    except a non-negative input, calibrated over the whole range (max x / 255, zero point 0): twice the resolution,
    and ONNX Runtime drops the ReLU before it.
    When calibrating, a residual Add that feeds a quantized layer gets Q/DQ on both inputs too, so that the runtime
    adds in int8 and the convolutions on either branch end in integer kernels (QLinearAdd, fused Conv+Add).
    Returns the scale of each quantized input tensor."""
    graph = model.graph
    producer = producers_of(graph)
    reads = [(node, node.input[0], trained.get(node.name)) for node in layers]
    reads += [(reader, tensor, step) for tensor, readers, step in marks for reader in readers]
    marked_adds = list({id(r): r for _, readers, _ in marks for r in readers if r.op_type == "Add"}.values())
    adds = []
    if batches is not None:
        constants = {i.name for i in graph.initializer} | {tensor for tensor, _, _ in marks}  # not twice
        adds = _residual_adds(producer, [n.input[0] for n in layers], constants)
        reads += [(add, tensor, None) for add in adds for tensor in dict.fromkeys(add.input)]
    untrained = list(dict.fromkeys(tensor for _, tensor, trained_step in reads if trained_step is None))
    absmax = _calibrate(model, untrained, batches) if untrained else {}
    for tensor in absmax:  # a max pool of a calibrated tensor takes its range (no wider): one Q for both
        source = tensor
        while (pool := producer.get(source)) is not None and pool.op_type in MAX_POOL_OPS and pool.input[0] in absmax:
            source = pool.input[0]
        absmax[tensor] = absmax[source]
    unsigned = {t for t in untrained if runtime == "onnxruntime" and _non_negative(producer, t)}
    zero_type = np.uint8 if runtime == "onnxruntime" else np.int8

    def step(tensor: str, trained_step: tuple[float, bool] | None) -> tuple[float, int]:
        """(scale, zero point): int8 for TensorRT; uint8 for ONNX Runtime (the type its x86 kernels take)."""
        shift = 128 if runtime == "onnxruntime" else 0
        if trained_step is not None:
            scale, unsigned_grid = trained_step
            return scale, 0 if unsigned_grid else shift
        if tensor in unsigned:
            return max(absmax[tensor], 1e-12) / 255.0, 0
        return max(absmax[tensor], 1e-12) / 127.0, shift

    groups: dict[tuple[str, float, int], dict[int, onnx.NodeProto]] = defaultdict(dict)
    for node, tensor, trained_step in reads:  # a layer reading a marked tensor with its own (shared) step: once
        groups[(tensor, *step(tensor, trained_step))][id(node)] = node
    for i, ((tensor, scale, zero_point), by_id) in enumerate(groups.items()):
        readers = list(by_id.values())
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(scale, np.float32), f"act{i}.scale"),
                numpy_helper.from_array(np.array(zero_point, zero_type), f"act{i}.zero_point"),
            ]
        )
        _insert_qdq(graph, tensor, readers, [f"act{i}.scale", f"act{i}.zero_point"], f"act{i}")
    _pool_quantized_inputs(graph)
    _quantize_outputs(graph, layers + adds + marked_adds)
    _drop_relus_after_unsigned_pairs(graph)
    if runtime == "onnxruntime":
        _keep_pools_float(graph)
    _fold_unfused_weights(graph, layers)
    return {tensor: scale for tensor, scale, _ in groups}


def _zero_points_at_least(graph: onnx.GraphProto) -> set[str]:
    """The activation zero points (`<name>.zero_point`) at their type's least value: a Q/DQ pair with one maps every
    negative value to 0, a ReLU's work."""
    zero_points = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith(".zero_point")}
    return {
        name
        for name, zero in zero_points.items()
        if zero.dtype.kind in "iu" and bool(np.all(zero == np.iinfo(zero.dtype).min))
    }


def _drop_relus_after_unsigned_pairs(graph: onnx.GraphProto) -> None:
    """A ReLU that reads a DequantizeLinear whose zero point is its type's least value is the identity (every value
    it gets is >= 0): bypassed, so that integer kernels' outputs reach the next Q/DQ through pooling and reshapes."""
    lowest = _zero_points_at_least(graph)
    dequantized = [n for n in graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2]
    unsigned = {n.output[0] for n in dequantized if n.input[2] in lowest}
    outputs = {o.name for o in graph.output}  # a ReLU that writes the graph's output keeps its name there
    bypassed = [n for n in graph.node if n.op_type == "Relu" and n.input[0] in unsigned and n.output[0] not in outputs]
    for relu in bypassed:
        for node in graph.node:
            node.input[:] = [relu.input[0] if name == relu.output[0] else name for name in node.input]
        graph.node.remove(relu)


def _keep_pools_float(graph: onnx.GraphProto) -> None:
    """A ReLU between a max pool on a float layer's output (an image's first convolution, left float) and the
    QuantizeLinear after it. ONNX Runtime moves a QuantizeLinear up through a max pool and then pools uint8 in NCHW,
    14-28x slower than its float pool on this host (2.0 of ResNet-18's 9.1 ms at 224x224, batch 1); a ReLU stops it,
    and ONNX Runtime then fuses the ReLU into the QuantizeLinear. Only where the ReLU changes no value: the pool's
    output is a ReLU's (or the QuantizeLinear clamps at 0 itself, its zero point its type's least value)."""
    producer, lowest = producers_of(graph), _zero_points_at_least(graph)

    def quantized(tensor: str) -> bool:
        """Whether `tensor` comes from a DequantizeLinear, up through ReLUs and Concats: pooled in int8 already."""
        node = producer.get(tensor)
        if node is None or node.op_type not in ("Relu", "Concat", "DequantizeLinear"):
            return False
        return node.op_type == "DequantizeLinear" or any(quantized(t) for t in node.input)

    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        pool = producer.get(q.input[0])
        if pool is None or pool.op_type != "MaxPool" or quantized(pool.input[0]):
            continue
        if (len(q.input) > 2 and q.input[2] in lowest) or _non_negative(producer, q.input[0]):
            relu = helper.make_node("Relu", [q.input[0]], [f"{q.name}.relu"], name=f"{q.name}.relu")
            q.input[0] = relu.output[0]
            graph.node.insert(list(graph.node).index(q), relu)


def _fold_unfused_weights(graph: onnx.GraphProto, layers: list[onnx.NodeProto]) -> None:
    """A layer whose output goes to no QuantizeLinear cannot become an integer kernel in ONNX Runtime, which would then
    dequantize its weight on every call: its weight goes back to the Mul(Cast) form, folded once at load. (TensorRT
    could still run such a layer in INT8 with a float output; ONNX Runtime cannot, and it is what is measured here.)"""
    reading = readers_of(graph)
    producer = producers_of(graph)
    initializers = {i.name: i for i in graph.initializer}
    fused = {id(layer): [n.op_type for n in reading[layer.output[0]]] == ["QuantizeLinear"] for layer in layers}
    for dq in {id(d): d for layer in layers if (d := producer.get(layer.input[1])) is not None}.values():
        # a module applied twice has one weight for two layer nodes: it folds when neither output is quantized
        if dq.op_type != "DequantizeLinear" or any(fused.get(id(n), True) for n in reading[dq.output[0]]):
            continue
        stored, scale = initializers[dq.input[0]], initializers[dq.input[1]]
        graph.initializer.remove(scale)  # the Mul(Cast) form's scale takes its name, shaped to broadcast
        per_channel = torch.tensor(numpy_helper.to_array(scale)).reshape((-1,) + (1,) * (len(stored.dims) - 1))
        storage = "int4" if stored.data_type == TensorProto.INT4 else "int8"
        name = dq.name.removesuffix(".dequantize")
        new_initializers, nodes = _dequantize(name, storage, per_channel, stored.name, dq.output[0], as_qdq=False)
        graph.initializer.extend(new_initializers)
        position = list(graph.node).index(dq)
        graph.node.remove(dq)
        for node in reversed(nodes):
            graph.node.insert(position, node)
    _drop_unused_initializers(graph)


def _code_tensors(model: onnx.ModelProto, trained: dict[str, nn.Module], matches: dict) -> dict[str, tuple]:
    """Each trained step's quantizer and the file's tensor of its codes: the QuantizeLinear output its layer reads."""
    producer = producers_of(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    found = {}
    for name, quantizer in trained.items():
        readers = [nodes[m.name] for m in matches.get(name, []) if m.name in nodes]
        pairs = [producer.get(n.input[0]) for n in readers]
        if dq := next((d for d in pairs if d is not None and d.op_type == "DequantizeLinear"), None):
            found[name] = quantizer, dq.input[0]
    return found


def _by_name(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The graph's own node objects for `nodes` (a version conversion copies the graph), in graph order."""
    names = {n.name for n in nodes}
    return [n for n in model.graph.node if n.name in names]


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike,
    *,
    int4: bool = False,
    calibration: Sequence[Tensor] | None = None,
    parity_inputs: Sequence[Tensor] | None = None,
    tolerance: float | None = 1e-4,
    float_path: str | os.PathLike | None = None,
    runtime: str = "tensorrt",
) -> ExportResult:
    """Export `model` (thinned and quantized, or plain float) to ONNX at `path`.

    Args:
        example_input: one input batch; the batch dimension is dynamic in the file.
        int4: store layers whose integers all fit [-8, 7] as int4 (opset 21; ONNX Runtime only); the others as int8.
        calibration: input batches; when given, each quantized layer's input gets a per-tensor int8 Q/DQ pair. Layers
            trained with int8 inputs (an `input_quantizer`) get one with their trained scale in any case.
        parity_inputs: batches on which ONNX Runtime and PyTorch are compared (default: `example_input`).
        tolerance: the largest relative error (max |ort - torch| / max |torch|) accepted; None: measure, never fail.
            A model trained with int8 activations computes what the file's Q/DQ pairs define, run as the ONNX standard
            defines each op: each layer's int8 input codes are compared (at most 2% of them may move:
            `parity.CODES_TOLERANCE`), and the tolerance holds the outputs PyTorch computes from the file's codes
            (`Parity.forced_max_rel`; a free run's, where moved levels compound with depth, is reported beside it,
            held to at least `parity.FREE_RUN_TOLERANCE` only where no step could be compared); ONNX Runtime's
            integer kernels, which round each bias to the int32 grid of input scale x weight scale and requantize in
            fixed point (arithmetic its training did not simulate), are measured beside it
            (`Parity.kernels_max_rel`; 1.1-1.4% on the main job, top-1 0.06 points).
        float_path: where to keep the same network exported with float32 weights (for comparisons); default: not kept.
        runtime: whom the int8 activations are laid out for. "tensorrt": symmetric int8 (zero point 0), the only form
            TensorRT takes, checked against its rules. "onnxruntime": uint8, the type ONNX Runtime's x86 integer
            kernels take; a calibrated input that a ReLU made non-negative spans the whole range (zero point 0), so
            ONNX Runtime drops the ReLU into the integer kernel; and
            a layer reading fewer than 4 channels per group (a first convolution on an image) keeps float inputs,
            where ONNX Runtime's float kernel is faster than its integer one. Trained steps keep the grid they trained
            on: int8 (as uint8 with zero point 128), or uint8 where they trained for ONNX Runtime (`activation_runtime`;
            refused in the TensorRT layout).
    """
    path, keep_float = Path(path), float_path
    _check_model(model)
    if tolerance is not None and not tolerance > 0:
        raise ValueError(f"tolerance={tolerance} must be > 0 (or None to measure without a limit).")
    check_runtime_fits(model, runtime)
    layers = quantized_layers(model)
    example = example_input.detach().to(next(model.parameters(), example_input).device)
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(atomic_path(path))
        except OSError as error:
            raise ExportError(
                f"Cannot write the ONNX file '{path}': {error}. Choose a directory you can write to."
            ) from error
        float_path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "float.onnx"
        marked = has_residual_steps(model)
        with inference_form(model) as weights, marking_steps():
            _export_float(model, example, float_path, marked)
        onnx_model = onnx.load(str(float_path))
        if marked:  # the float copy reads its residual Adds' inputs unquantized
            plain = onnx.ModelProto()
            plain.CopyFrom(onnx_model)
            _take_marks(plain)
            onnx.save(plain, str(float_path))
        float_bytes = float_path.stat().st_size
        trained = {name: m.input_quantizer for name, m in layers.items() if _trained_input(m)}
        qdq = set(layers) if calibration is not None else set(trained)
        if runtime == "onnxruntime":
            qdq = {name for name in qdq if name in trained or layers[name].weight.shape[1] >= FEW_INPUT_CHANNELS}
        reports, matches = _rewrite_weights(onnx_model, layers, weights, int4, qdq)
        if int4 and any(r.storage == "int4" for r in reports):
            onnx_model = onnx.version_converter.convert_version(onnx_model, 21)
            del onnx_model.graph.value_info[:]  # shapes the converter inferred: optional, and not free
        stored = {r.name for r in reports if r.storage != "float"}
        if floats := {r.name: r.reason for r in reports if r.storage == "float"}:
            warnings.warn(
                f"{len(floats)} quantized layer(s) stay float32 in the file (exact, but neither smaller nor integer): "
                f"{floats}. SelfCompression's max_bits (8 by default) keeps every layer within int8.",
                stacklevel=2,
            )
        quantized = [node for name in qdq & stored for node in matches[name] if node.op_type in WEIGHT_OPS]
        # every layer trained with an input step reads its input through it in the file, as in training (exact),
        # also where its weight stays float or a MatMul reads it (no integer kernel there)
        integer = {node.name for node in quantized}
        quantized += [node for name in trained for node in matches[name] if node.name not in integer]
        if calibration is not None and not stored:
            raise ExportError(
                "calibration was given, but the model has no quantized layer to calibrate (activation Q/DQ goes on "
                "the input of each layer stored as int8/int4). Attach quantizers (SelfCompression) first, or export "
                "without calibration (calibrate_batches=0)."
            )
        node_steps = {
            node.name: (trained[name].scale, bool(trained[name].unsigned))
            for name in trained
            for node in matches[name]
        }
        # a step trained less a BatchNorm's shift (`folded_steps`): that shift moves into its layer's bias
        shifted = {node.name for name, step in trained.items() if step.shifted for node in matches[name]}
        folded = fold_batchnorm(onnx_model, fixed=set(node_steps) - shifted)
        fold_reembeddings(onnx_model)
        fold_output_scales(onnx_model)
        scales, marks = {}, _take_marks(onnx_model)
        if quantized:
            layer_nodes = _by_name(onnx_model, quantized)
            scales = _quantize_activations(onnx_model, layer_nodes, node_steps, marks, calibration, runtime)
        onnx.checker.check_model(onnx_model, full_check=True)
        if runtime == "tensorrt":
            check_explicit_quantization(onnx_model)
        onnx.save(onnx_model, str(tmp))
        inputs = list(parity_inputs) if parity_inputs is not None else [example]
        steps = _code_tensors(onnx_model, trained, matches)  # and layer by layer, the codes themselves
        parity = check_parity(tmp, model, inputs, tolerance, integer_kernels=bool(trained), steps=steps)
        file_bytes = tmp.stat().st_size
        if keep_float is not None:  # only now: a failed export leaves no float copy either
            with atomic_path(keep_float) as float_tmp:
                shutil.copyfile(float_path, float_tmp)
    return ExportResult(path, reports, file_bytes, float_bytes, stored_weight_bits(onnx_model), parity, scales, folded)
