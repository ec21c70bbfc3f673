"""BatchNorm folded into the neighbouring convolution, in an exported ONNX graph, without leaving the integer grid.

BatchNorm in eval mode is y = a x + t per channel (a = gamma / sqrt(var + eps), t = beta - a mean). Two places fold:

- Conv -> BN: the convolution's per-channel weight scale and its bias take a (bias' = a (bias - mean) + beta).
- Conv -> ReLU -> BN with every a > 0: a passes through the ReLU (relu(a z) = a relu(z)) into the scale and bias; the
  shift t travels on through MaxPool (max(y + t) = max(y) + t) and a flattening Reshape into the next Conv/Gemm's
  bias (W (y + t) = W y + W t), which must have no zero padding (padding would see 0, not t).

Quantized layers keep their integers: only the scale next to them (`DequantizeLinear` or `Mul(Cast)`) changes, so
the stored size does not move. A negative a stays a BatchNorm node (TensorRT needs positive scales, and a negative
factor cannot pass a ReLU). Everything else is left as it is.

A residual branch's re-embedding (`core/reembed.py`: Concat with a zero channel, then Gather to the stream's width)
folds too, into the convolution that ends the branch: its weights, scales and bias are gathered the same way, zero
rows where the branch has no channel, so it writes the stream's width itself (through a ReLU: relu(0) = 0). The
zero rows store no bits, and they cost a few multiply-accumulates where the Gather cost a pass over memory on every
call and, in an int8 file, broke the chain of integer kernels (the Add and everything after it ran in float).
A positive constant factor on a layer's output folds into its scale and bias the same way.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["dequantized_weight", "fold_batchnorm", "fold_output_scales", "fold_reembeddings", "producers_of",
           "readers_of", "shape_only"]

ZERO_PRESERVING = ("Relu",)  # per-element ops with f(0) = 0: a zero channel stays zero through them
SHIFT_TRANSPARENT = ("MaxPool", "Reshape", "Flatten")  # ops that carry a per-channel shift through unchanged
SHAPE_ONLY = ("Shape",)  # consumers that read a tensor's shape, not its values
INTEGER_TYPES = (TensorProto.INT8, TensorProto.INT4)


def dequantized_weight(
    node: onnx.NodeProto, producer: dict[str, onnx.NodeProto], initializers: dict[str, onnx.TensorProto]
) -> tuple[str, str] | None:
    """(integer initializer, scale initializer) of a node that dequantizes a constant integer weight, in either form
    the export writes: `DequantizeLinear(integers, scale)` or `Mul(Cast(integers), scale)`; None for anything else."""
    if node.op_type == "DequantizeLinear":
        data, scale = node.input[0], node.input[1]
    elif node.op_type == "Mul":
        scale = next((i for i in node.input if i in initializers), "")
        cast = next((producer.get(i) for i in node.input if i != scale), None)
        data = cast.input[0] if cast is not None and cast.op_type == "Cast" else ""
    else:
        return None
    stored = initializers.get(data)
    if stored is None or stored.data_type not in INTEGER_TYPES or len(stored.dims) < 2 or scale not in initializers:
        return None  # activations, float layers
    return data, scale


def shape_only(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """Whether `node` reads its input for the shape alone: a Shape, or a Slice read only that way (the exporter's
    zeros_like(x.narrow(...))). `readers`: `readers_of` the graph."""
    after = [n for output in node.output for n in readers[output]]
    sliced = node.op_type == "Slice" and bool(after) and all(shape_only(n, readers) for n in after)
    return node.op_type in SHAPE_ONLY or sliced


def producers_of(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {output: node for node in graph.node for output in node.output}


def readers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    found: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            found[name].append(node)
    return found


class _Graph:
    """Lookups over an ONNX graph that the folds edit in place."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.producer = producers_of(self.graph)
        self.consumers = readers_of(self.graph)
        self.outputs = {o.name for o in self.graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node, also through the Identity nodes the exporter writes for
        deduplicated ones."""
        while name not in self.initializers and name in self.producer and self.producer[name].op_type == "Identity":
            name = self.producer[name].input[0]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return numpy_helper.to_array(self.initializers[name]) if name in self.initializers else None

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        """The one node reading `name`'s values (shape reads aside), or None."""
        readers = [n for n in self.consumers[name] if not shape_only(n, self.consumers)]
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        tensor = numpy_helper.from_array(value.astype(np.float32), name)
        if name in self.initializers:
            self.initializers[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.initializers[name] = self.graph.initializer[-1]


class _Layer:
    """A Conv or Gemm(transB=1) whose weight is a float initializer or integers times a per-channel scale initializer,
    each used by this layer alone: its weight can be read and its output channels rescaled."""

    def __init__(self, g: _Graph, node: onnx.NodeProto) -> None:
        self.g, self.node = g, node
        weight = node.input[1]
        self.scale_name, self.integers, self.integers_name, self.zero_point_name = weight, None, None, None
        source = g.producer.get(weight)
        stored = dequantized_weight(source, g.producer, g.initializers) if source is not None else None
        if stored is not None:
            self.integers_name, self.scale_name = stored
            self.integers = g.constant(self.integers_name)
            if source.op_type == "DequantizeLinear" and len(source.input) > 2:
                self.zero_point_name = source.input[2]
        if self.scale_name not in g.initializers or len(g.consumers[weight]) != 1:
            raise LookupError(f"{node.name}: its weight is not one layer's own constant")
        if len(g.consumers[self.scale_name]) != 1:
            raise LookupError(f"{node.name}: its weight scale is shared")
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        defaults = {"transA": 0, "transB": 0, "alpha": 1.0, "beta": 1.0}
        gemm = [attributes.get(k, default) for k, default in defaults.items()]
        if node.op_type == "Gemm" and gemm != [0, 1, 1.0, 1.0]:
            raise LookupError(f"{node.name}: a Gemm other than x W^T + b")
        padding = attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")
        self.padded = padding or any(attributes.get("pads", [0]))

    @property
    def weight(self) -> np.ndarray:
        scale = self.g.constant(self.scale_name)
        if self.integers is None:
            return scale.astype(np.float64)
        return self.integers.astype(np.float64) * scale.reshape((-1,) + (1,) * (self.integers.ndim - 1))

    @property
    def bias(self) -> np.ndarray:
        present = len(self.node.input) > 2 and self.node.input[2]
        value = self.g.constant(self.node.input[2]) if present else None
        return value.astype(np.float64) if value is not None else np.zeros(self.weight.shape[0])

    def set_bias(self, bias: np.ndarray) -> None:
        name = f"{self.node.name}.folded_bias"
        self.g.set_initializer(name, bias)
        if len(self.node.input) > 2:
            self.node.input[2] = name
        else:
            self.node.input.append(name)

    def gather_outputs(self, index: np.ndarray) -> None:
        """Output channel j becomes the old channel index[j], or a channel of zeros (no bits) where index[j] is the
        channel count: weights, scale, zero points and bias alike."""
        for name, pad in ((self.integers_name, 0), (self.scale_name, 1 if self.integers is not None else 0),
                          (self.zero_point_name, 0)):  # fmt: skip
            if name is None:
                continue
            value = numpy_helper.to_array(self.g.initializers[name])
            if value.ndim == 0:  # a per-tensor zero point
                continue
            padded = np.concatenate([value, np.full((1, *value.shape[1:]), pad, value.dtype)])
            self.g.initializers[name].CopyFrom(numpy_helper.from_array(padded[index], name))
        self.integers = None if self.integers is None else self.g.constant(self.integers_name)
        self.set_bias(np.append(self.bias, 0.0)[index])

    def scale_outputs(self, factor: np.ndarray) -> None:
        """Multiply every output channel (weights and bias) by `factor` (> 0): the integers stay as they are."""
        scale = self.g.constant(self.scale_name)
        self.set_bias(self.bias * factor)
        self.g.set_initializer(self.scale_name, scale * factor.reshape((-1,) + (1,) * (scale.ndim - 1)))


def _layer(g: _Graph, node: onnx.NodeProto | None) -> _Layer | None:
    if node is None or node.op_type not in ("Conv", "Gemm"):
        return None
    try:
        return _Layer(g, node)
    except LookupError:
        return None


def _shift_target(g: _Graph, tensor: str) -> _Layer | None:
    """The unpadded layer that a per-channel shift added to `tensor` reaches as its input, through shift-transparent
    ops only."""
    node = g.sole_consumer(tensor)
    while node is not None and node.input[0] == tensor and node.op_type in SHIFT_TRANSPARENT:
        tensor = node.output[0]
        node = g.sole_consumer(tensor)
    layer = _layer(g, node) if node is not None and node.input[0] == tensor else None
    return None if layer is None or layer.padded else layer


def _fold_one(g: _Graph, bn: onnx.NodeProto, fixed: Collection[str]) -> bool:
    params = [g.constant(name) for name in bn.input[1:5]]
    if any(p is None for p in params):
        return False
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    a = gamma / np.sqrt(var + np.float32(epsilon))
    shift = beta - a * mean
    source = g.producer.get(bn.input[0])
    if source is None or g.sole_consumer(bn.input[0]) is not bn or not np.all(a > 0):
        return False
    if source.op_type in ("Conv", "Gemm"):  # Conv -> BN
        layer = _layer(g, source)
        if layer is None:
            return False
        bias = layer.bias
        layer.scale_outputs(a)
        layer.set_bias(a * bias + shift)
    elif source.op_type == "Relu":  # Conv -> ReLU -> BN: a into the conv, the shift into the next layer's bias
        layer = _layer(g, g.producer.get(source.input[0]))
        nxt = _shift_target(g, bn.output[0])
        if layer is None or g.sole_consumer(source.input[0]) is not source or nxt is None or nxt.node.name in fixed:
            return False
        weight = nxt.weight
        inputs = weight.shape[1]
        if inputs % shift.size:
            return False
        spread = np.repeat(shift, inputs // shift.size)  # channel-major, as Reshape/Flatten of NCHW lay them out
        correction = (weight.reshape(weight.shape[0], inputs, -1).sum(2) * spread).sum(1)
        layer.scale_outputs(a)
        nxt.set_bias(nxt.bias + correction)
    else:
        return False
    for node in g.consumers[bn.output[0]]:  # BN's readers now read its input
        for i, name in enumerate(node.input):
            if name == bn.output[0]:
                node.input[i] = bn.input[0]
    g.graph.node.remove(bn)
    return True


def _reembedded(g: _Graph, gather: onnx.NodeProto) -> tuple[_Layer, onnx.NodeProto] | None:
    """(the layer that ends the branch, the Concat) where `gather` re-embeds that layer's output, through
    zero-preserving ops, and nothing else reads it at the branch's width."""
    concat = g.producer.get(gather.input[0])
    index = g.constant(gather.input[1])
    if _attribute(gather, "axis", 0) != 1 or concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        return None
    zeros = g.producer.get(concat.input[1])
    if _attribute(concat, "axis") != 1 or zeros is None or zeros.op_type != "ConstantOfShape":
        return None
    if any(numpy_helper.to_array(a.t).any() for a in zeros.attribute if a.name == "value"):
        return None
    if index is None or index.ndim != 1 or g.sole_consumer(concat.output[0]) is not gather:
        return None
    tensor, reader = concat.input[0], concat
    while g.sole_consumer(tensor) is reader and tensor in g.producer:
        node = g.producer[tensor]
        if node.op_type not in ZERO_PRESERVING:
            layer = _layer(g, node)
            if layer is None or _attribute(node, "group", 1) != 1 or index.max() > layer.weight.shape[0]:
                return None
            return layer, concat
        tensor, reader = node.input[0], node
    return None


def _attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _fold_reembedding(g: _Graph, gather: onnx.NodeProto) -> str | None:
    found = _reembedded(g, gather)
    if found is None or gather.output[0] in g.outputs:
        return None
    layer, concat = found
    layer.gather_outputs(g.constant(gather.input[1]).astype(np.int64))
    for node in g.consumers[gather.output[0]]:  # they read the branch's own output, now at the stream's width
        node.input[:] = [concat.input[0] if name == gather.output[0] else name for name in node.input]
    g.graph.node.remove(gather)
    return layer.node.name


def fold_reembeddings(model: onnx.ModelProto) -> list[str]:
    """Fold every branch re-embedding (Concat with zeros, Gather) into the layer that ends its branch, in place (see
    the module docstring); returns the names of the layers that now write the stream's width."""
    folded = _fold_all(model, "Gather", _fold_reembedding)
    if folded:
        del model.graph.value_info[:]  # shapes the exporter inferred at the branches' widths (optional in ONNX)
    return folded


def _fold_output_scale(g: _Graph, mul: onnx.NodeProto) -> str | None:
    values = [g.constant(name) for name in mul.input]
    if sum(v is not None for v in values) != 1:
        return None
    factor = next(v for v in values if v is not None)
    source = g.producer.get(next(name for name, v in zip(mul.input, values) if v is None))
    layer = _layer(g, source)
    readers = g.consumers[source.output[0]] if layer is not None else []
    if len(readers) != 1 or source.output[0] in g.outputs or factor.size != 1 or not float(factor) > 0:
        return None
    layer.scale_outputs(np.full(layer.weight.shape[0], float(factor)))
    source.output[0] = mul.output[0]
    g.graph.node.remove(mul)
    return source.name


def fold_output_scales(model: onnx.ModelProto) -> list[str]:
    """Fold a positive constant factor on a layer's output (ResNet-9's `linear(x) * 0.125`) into the layer's scale and
    bias, in place; returns the names of the layers that took one. The integers stay as they are."""
    return _fold_all(model, "Mul", _fold_output_scale)


def _fold_all(model: onnx.ModelProto, op_type: str, fold: Callable[[_Graph, onnx.NodeProto], str | None]) -> list[str]:
    """`fold` on every node of `op_type` (it returns what it folded, or None having changed nothing), then the nodes
    and initializers left unread go. The lookups are built once and again only after a fold changed the graph: a
    network has thousands of Mul nodes, and rebuilding them per node made the export quadratic."""
    folded, g = [], _Graph(model)
    for node in [n for n in model.graph.node if n.op_type == op_type]:
        name = fold(g, node)
        if name is not None:
            folded.append(name)
            g = _Graph(model)
    _prune(model.graph)
    return folded


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (the Identity copies of BatchNorm parameters) and unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def fold_batchnorm(model: onnx.ModelProto, fixed: Collection[str] = ()) -> list[str]:
    """Fold every BatchNormalization node of `model` that folds exactly (see the module docstring), in place; returns
    the names of the folded nodes. No shift moves into the input of a node named in `fixed` (an input quantized
    with a trained scale: the tensor it was trained on must stay the one it quantizes)."""
    def fold(g: _Graph, bn: onnx.NodeProto) -> str | None:
        return bn.name if len(bn.output) == 1 and _fold_one(g, bn, fixed) else None

    return _fold_all(model, "BatchNormalization", fold)
