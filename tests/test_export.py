"""ONNX export: exact integer weights, parity with PyTorch in ONNX Runtime on the surgery zoo (thinned, 2:4), TensorRT's
explicit-quantization rules, and clear errors that leave no file behind."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import helper, numpy_helper
from torch import nn

from lightning_selfcompress.check24 import check_onnx
from lightning_selfcompress.core.export import ExportError, export_onnx, integer_weights, stored_weights
from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.onnx_rules import QuantizationRuleError, check_explicit_quantization
from lightning_selfcompress.core.parity import ParityError
from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers, integer_bits, quantized_layers
from lightning_selfcompress.core.sparsity import attach_masks, masked_layers
from lightning_selfcompress.core.surgery import Removal, Surgeon
from lightning_selfcompress.report import write_json
from lightning_selfcompress.testing import choose_branch_channels, choose_groups, kill_branch_channels, kill_groups

from surgery_helpers import LARGE, TRANSFORMERS, ZOO, freeze_statistics


def dequantized_initializers(path) -> dict[str, np.ndarray]:
    """Layer name -> what the file computes for each integer weight, in numpy float32 (int * scale per channel)."""
    model = onnx.load(str(path))
    names = {n.output[0]: n.name.removesuffix(".dequantize") for n in model.graph.node}
    return {
        names[output]: ints.astype(np.float32) * scale.reshape((-1,) + (1,) * (ints.ndim - 1))
        for output, (ints, scale) in stored_weights(model).items()
    }


def float_weight_of(path, layer: str) -> np.ndarray:
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    return inits[f"{layer}.weight"]


class ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 8, 1), nn.Linear(8 * 36, 6, bias=False)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))).flatten(1))


def random_quantizers(net: nn.Module, low: float, high: float, seed: int = 0) -> None:
    """Random real-valued b in [low, high) and e in [-8, -2) per channel: non-integer exponents, dead and wide channels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in quantized_layers(net).values():
            q = m.weight_quantizer
            q.bits.copy_(low + (high - low) * torch.rand(q.bits.shape, generator=g))
            q.exponent.copy_(-8 + 6 * torch.rand(q.exponent.shape, generator=g))


def test_integer_weights_times_scale_are_the_quantized_weights():
    net = ConvLinear()
    attach_quantizers(net)
    random_quantizers(net, -3.0, 14.0)
    for m in quantized_layers(net).values():
        ints, scale = integer_weights(m)
        assert torch.equal(ints, ints.round())
        q = m.weight_quantizer(m.weight)
        assert torch.equal(ints * scale.view((-1,) + (1,) * (ints.dim() - 1)), q)


def test_initializers_dequantize_exactly_to_the_quantized_weights(tmp_path):
    net = ConvLinear()
    attach_quantizers(net)
    random_quantizers(net, -3.0, 8.0)  # b <= 0 (dead), 0 < b < 1 (values -2^e) and up to 8 bits
    with torch.no_grad():
        net.a.weight_quantizer.bits[[0, 3]] = torch.tensor([-1.5, 0.0])
        net.b.weight_quantizer.bits[2] = 12.0  # one channel above 8 bits ...
        net.b.weight_quantizer.exponent[2] = -12.0  # ... whose integers reach past 127: that layer stays float
    x = torch.randn(2, 3, 8, 8)
    result = export_onnx(net, x, tmp_path / "net.onnx")
    storage = {layer.name: layer.storage for layer in result.layers}
    assert storage == {"a": "int8", "b": "float", "c": "int8"}
    assert "1 channel(s) need more than 8 bits" in next(r.reason for r in result.layers if r.name == "b")
    weights = dequantized_initializers(tmp_path / "net.onnx")
    assert set(weights) == {"a", "c"}
    for name, m in quantized_layers(net).items():
        expected = m.weight_quantizer(m.weight).detach().numpy()
        got = weights[name] if name in weights else float_weight_of(tmp_path / "net.onnx", name)
        assert np.array_equal(got, expected), name  # bit for bit, no tolerance
    assert not weights["a"][[0, 3]].any(), "dead channels are exact zeros"
    assert result.parity.max_rel < 1e-6
    assert check_explicit_quantization(tmp_path / "net.onnx") == 0, "weight-only: Cast+Mul, no Q/DQ node"
    export_onnx(net, x, tmp_path / "qdq.onnx", calibration=[x], tolerance=None)
    with_activations = dequantized_initializers(tmp_path / "qdq.onnx")
    assert set(with_activations) == {"a", "c"}
    assert all(np.array_equal(with_activations[name], weights[name]) for name in weights), "the same weights"
    # An input Q/DQ per layer; neither layer can be an integer kernel (a feeds the float b, c is the output), so
    # their weights stay Mul(Cast), folded at load.
    assert check_explicit_quantization(tmp_path / "qdq.onnx") == 2 * 2


def test_midrise_weights_store_as_odd_integers_at_half_the_step(tmp_path):
    net = ConvLinear()
    attach_quantizers(net, QuantizationConfig(grid="midrise"))
    random_quantizers(net, -3.0, 7.0)  # dead, binary (0 < b <= 1) and up to 7 bits: 2k + 1 within int8
    with torch.no_grad():
        net.b.weight_quantizer.bits[2] = 7.5  # 2^6.5 levels each side: 2k + 1 reaches past 127, b stays float
        net.b.weight_quantizer.exponent[2] = -12.0
        net.a.weight_quantizer.bits[1], net.c.weight_quantizer.bits[0] = 0.6, 1.0  # binary channels
    x = torch.randn(2, 3, 8, 8)
    result = export_onnx(net, x, tmp_path / "net.onnx")
    assert {layer.name: layer.storage for layer in result.layers} == {"a": "int8", "b": "float", "c": "int8"}
    weights = dequantized_initializers(tmp_path / "net.onnx")
    for name in weights:
        m = net.get_submodule(name)
        assert np.array_equal(weights[name], m.weight_quantizer(m.weight).detach().numpy()), name
        alive = (m.weight_quantizer.bits > 0).numpy()
        stored = stored_weights(onnx.load(str(tmp_path / "net.onnx")))
        ints = next(i for output, (i, _) in stored.items() if output.startswith(name))
        assert (ints[alive] % 2 == 1).all() and not ints[~alive].any(), "live channels odd, dead ones zeros"
        stored, bits = integer_bits(torch.from_numpy(ints).float()), m.weight_quantizer.bits.detach()
        assert (stored <= bits.ceil().clamp_min(0)).all() and (stored[alive] >= 1).all()
        binary = (bits > 0) & (bits <= 1)
        assert (stored[binary] == 1).all(), "0 < b <= 1: one bit, a binary channel"
    assert result.parity.max_rel < 1e-6


def test_a_branch_cut_before_a_non_global_adaptive_pooling_still_exports(tmp_path):
    class PooledTwice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
            self.head = nn.Linear(8 * 4, 5)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = x + self.branch(x)
            return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))

    net, x = PooledTwice().eval(), torch.randn(2, 3, 8, 8)
    graph = ChannelGraph(net, x)
    cuts = choose_branch_channels(graph, 0.5)
    kill_branch_channels(graph, cuts, bits=False)
    Surgeon(graph).remove(Removal(torch.zeros(graph.num_groups, dtype=torch.bool), cuts=cuts))
    assert net.branch[0].out_channels == 4 < net.stem.out_channels, "the branch is re-embedded"
    assert export_onnx(net, x, tmp_path / "net.onnx").parity.max_rel < 1e-5


def test_int4_storage_where_every_integer_fits_four_bits(tmp_path):
    import onnxruntime

    net = ConvLinear()
    attach_quantizers(net)
    random_quantizers(net, -1.0, 4.0)
    with torch.no_grad():
        net.c.weight_quantizer.bits[0] = 6.0
        net.c.weight_quantizer.exponent[0] = -9.0  # integers up to 31: int8
    x = torch.randn(3, 3, 8, 8)
    result = export_onnx(net, x, tmp_path / "net.onnx", int4=True)
    assert {layer.name: layer.storage for layer in result.layers} == {"a": "int4", "b": "int4", "c": "int8"}
    model = onnx.load(str(tmp_path / "net.onnx"))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    assert {i.name: i.data_type for i in model.graph.initializer}["a.weight_int4"] == onnx.TensorProto.INT4
    weights = dequantized_initializers(tmp_path / "net.onnx")
    for name, m in quantized_layers(net).items():
        assert np.array_equal(weights[name], m.weight_quantizer(m.weight).detach().numpy()), name
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": x.numpy()})[0]  # ONNX Runtime casts int4 on CPU
    np.testing.assert_allclose(out, net(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert result.file_bytes < export_onnx(net, x, tmp_path / "int8.onnx").file_bytes


# Not the transformers: a Linear on a channels-last input exports as float MatMul, not as int8 (open work, issue 12)
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in ZOO if n not in TRANSFORMERS]
)
def test_thinned_sparse_zoo_runs_in_onnx_runtime_like_pytorch(name, tmp_path):
    make, shape = ZOO[name]
    if (
        name == "vgg11_bn"
    ):  # its adaptive pool to 7x7 exports only where 7 divides the feature map (ONNX has no such op)
        shape = (3, 224, 224)
    net = make()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        net.train()(x)  # running statistics that are not the initial ones
    freeze_statistics(net)
    attach_quantizers(net)
    graph = ChannelGraph(net, x[:2])
    killed = choose_groups(graph, 0.3, seed=1)
    cuts = choose_branch_channels(graph, 0.25, seed=1, spare=killed)  # residual branches re-embed their outputs
    kill_groups(graph, killed)
    kill_branch_channels(graph, cuts)
    surgeon = Surgeon(graph, round_to=4)  # widths stay multiples of 4, so that most layers can hold 2:4
    removal = surgeon.find()
    assert bool(removal.cuts) == bool(graph.branches)
    assert surgeon.remove(removal).weights_removed > 0
    masked, _ = attach_masks(net)  # 2:4 after the cut
    random_quantizers(net, 2.0, 8.0)
    net.eval()
    result = export_onnx(net, x[:1], tmp_path / f"{name}.onnx", parity_inputs=[x], tolerance=1e-4)
    assert result.parity.max_rel <= 1e-4
    assert all(layer.storage == "int8" for layer in result.layers)
    sparse = {c.name.removesuffix(".weight_dequantized") for c in check_onnx(tmp_path / f"{name}.onnx") if c.sparse}
    assert set(masked) <= sparse, "every 2:4 layer is 2:4 in the file, along TensorRT's axis"
    assert set(masked_layers(net)) == set(masked)


def test_activation_quantization_is_calibrated_and_follows_tensorrts_rules(tmp_path):
    net = ConvLinear()
    attach_quantizers(net)
    random_quantizers(net, 6.0, 8.0)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    result = export_onnx(
        net, batches[0], tmp_path / "net.onnx", calibration=batches, parity_inputs=batches, tolerance=0.05
    )
    assert len(result.activation_scales) == 3
    assert 0 < result.parity.max_rel <= 0.05, "int8 activations cost a little, within the stated tolerance"
    model = onnx.load(str(tmp_path / "net.onnx"))
    assert [n.op_type for n in model.graph.node].count("QuantizeLinear") == 3 + 2, "each input; a's and b's outputs"
    assert check_explicit_quantization(model) == 2 + 2 * 3 + 2 * 2, "c, the output layer, keeps its weight as Mul(Cast)"
    first = max(float(b.abs().max()) for b in batches)
    assert result.activation_scales["input"] == pytest.approx(first / 127, rel=1e-6)
    ops = optimized_ops(tmp_path / "net.onnx", tmp_path)
    assert ops.count("QLinearConv") == 2, f"a and b run as integer kernels in ONNX Runtime: {ops}"


def test_the_output_requantization_adds_no_error_of_its_own(tmp_path):
    """The Q/DQ added on a layer's output carries the next layer's input scale through ReLU and reshapes, which
    commute with symmetric rounding: in exact arithmetic the file computes what it computes without it. ONNX Runtime's
    integer kernel rounds its products differently from a float convolution, so values at a rounding tie may move
    by one step; the error against PyTorch stays that of int8 activations."""
    import onnxruntime

    net = ConvLinear()
    attach_quantizers(net)
    random_quantizers(net, 6.0, 8.0)
    x = torch.randn(64, 3, 8, 8)
    export_onnx(net, x, tmp_path / "net.onnx", calibration=[x], tolerance=None)
    model = onnx.load(str(tmp_path / "net.onnx"))
    without = onnx.ModelProto()
    without.CopyFrom(model)
    added = [n for n in without.graph.node if ".output." in n.name]  # Q, DQ pairs
    quantized = [n for n in added if n.op_type == "QuantizeLinear"]
    original = {n.output[0].replace("quantized", "dequantized"): n.input[0] for n in quantized}
    for node in added:
        without.graph.node.remove(node)
    for node in without.graph.node:
        node.input[0] = original.get(node.input[0], node.input[0])
    assert len(added) == 4
    reference = net.eval()(x).detach().numpy()
    errors = [
        np.abs(onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"input": x.numpy()})[0] - reference).mean()
        for m in (model, without)
    ]  # fmt: skip
    assert errors[0] <= 1.1 * errors[1], errors


def test_an_onnx_runtime_layout_fuses_the_relus_and_keeps_a_first_layer_on_images_float(tmp_path):
    net = ConvLinear()
    attach_quantizers(net)
    random_quantizers(net, 6.0, 8.0)
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    path = tmp_path / "net.onnx"
    result = export_onnx(net, batches[0], path, calibration=batches, parity_inputs=batches, tolerance=0.05,
                         runtime="onnxruntime")  # fmt: skip
    assert 0 < result.parity.max_rel <= 0.05
    model = onnx.load(str(path))
    zero_points = [int(numpy_helper.to_array(i)) for i in model.graph.initializer if i.name.startswith("act")
                   and i.name.endswith("zero_point")]  # fmt: skip
    assert zero_points == [0, 0], "b's and c's inputs come from ReLUs: uint8 from 0; a's (the image, 3 channels) float"
    with torch.no_grad():
        b_input = max(float(torch.relu(net.a(x)).max()) for x in batches)
    assert result.activation_scales["/Relu_output_0"] == pytest.approx(b_input / 255, rel=1e-5), "the whole range"
    with pytest.raises(QuantizationRuleError, match="zero point must be 0 of a signed type"):
        check_explicit_quantization(model)  # TensorRT's layout is the default, and the only one TensorRT takes
    ops = optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 1 and ops.count("Conv") == 1, f"a float, b an integer kernel: {ops}"
    assert "Relu" not in ops, f"each ReLU fused into the kernel before it: {ops}"


@pytest.mark.parametrize("runtime", ["tensorrt", "onnxruntime"])
def test_a_residual_add_is_quantized_so_that_both_branches_end_in_integer_kernels(runtime, tmp_path):
    from lightning_selfcompress.models import ResNet9

    net = ResNet9(1, 10, width=4).eval()
    attach_quantizers(net, QuantizationConfig(init_bits=6))
    batches = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    path = tmp_path / "net.onnx"
    result = export_onnx(net, batches[0], path, calibration=batches, parity_inputs=batches, tolerance=0.05,
                         runtime=runtime)  # fmt: skip
    assert result.parity.max_rel <= 0.05
    add = next(n for n in onnx.load(str(path)).graph.node if n.name == "/layer1/layer1.2/Add")
    assert all(i.startswith("act") and ".dequantized" in i for i in add.input), f"both inputs through Q/DQ: {add.input}"
    if runtime == "onnxruntime":  # the TensorRT layout passed TensorRT's rules inside export_onnx
        ops = optimized_ops(path, tmp_path)
        assert ops.count("QLinearConv") == 7 and "QLinearAdd" in ops, f"every conv but the first on the image: {ops}"


class Tokens(nn.Module):
    """Linear layers on [batch, tokens, channels], as in a transformer's MLP: the exporter writes them as MatMul."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((tokens + self.mlp(tokens)).mean(1))


def test_linear_layers_on_tokens_store_int8_weights_that_fold_at_load(tmp_path):
    net = Tokens()
    attach_quantizers(net)
    random_quantizers(net, 3.0, 8.0)
    x = torch.randn(4, 3, 16, 16)
    result = export_onnx(net, x, tmp_path / "net.onnx", float_path=tmp_path / "float.onnx")
    assert {layer.name: layer.storage for layer in result.layers} == dict.fromkeys(
        ["embed", "mlp.0", "mlp.2", "head"], "int8"
    ), [layer.reason for layer in result.layers]
    assert [n.op_type for n in onnx.load(str(tmp_path / "net.onnx")).graph.node].count("MatMul") == 2
    expected = sum(int((integer_bits(integer_weights(m)[0]) * m.weight[0].numel()).sum())
                   for m in quantized_layers(net).values())  # fmt: skip
    assert result.weight_bits == expected, "every layer's integers are in the file, counted per output channel"
    assert optimized_ops(tmp_path / "net.onnx", tmp_path) == optimized_ops(tmp_path / "float.onnx", tmp_path)
    calibrated = export_onnx(net, x, tmp_path / "int8.onnx", calibration=[x], tolerance=None)
    assert [s.storage for s in calibrated.layers].count("int8") == 4 and len(calibrated.activation_scales) == 2


def test_a_branch_cut_from_a_residual_block_keeps_both_branches_in_integer_kernels(tmp_path):
    """A cut from one branch alone re-embeds its output (Concat with zeros, Gather in PyTorch's graph); in the file the
    branch's last convolution writes the stream's width itself (zero rows), so both residual Adds stay in int8."""
    from lightning_selfcompress.models import ResNet9

    net = ResNet9(1, 10, width=4).eval()
    attach_quantizers(net, QuantizationConfig(init_bits=6))
    x = torch.randn(8, 1, 28, 28)
    graph = ChannelGraph(net, x[:2])
    cuts = choose_branch_channels(graph, 0.5, seed=1)
    kill_branch_channels(graph, cuts)
    Surgeon(graph).remove(Removal(torch.zeros(graph.num_groups, dtype=torch.bool), cuts=cuts))
    assert cuts, "channels cut from a branch alone"
    export_onnx(net, x, tmp_path / "net.onnx", calibration=[x], tolerance=0.05, runtime="onnxruntime")
    assert "Gather" not in [n.op_type for n in onnx.load(str(tmp_path / "net.onnx")).graph.node], "folded"
    ops = optimized_ops(tmp_path / "net.onnx", tmp_path)
    assert ops.count("QLinearConv") == 7, f"every conv but the first on the image, the cut branches' too: {ops}"
    assert ops.count("QLinearAdd") == 2 and "Add" not in ops, f"both residual adds in int8: {ops}"


def test_an_unknown_runtime_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="runtime='tflite' is not one of"):
        export_onnx(ConvLinear(), torch.randn(2, 3, 8, 8), tmp_path / "net.onnx", runtime="tflite")
    assert leftovers(tmp_path) == []


def test_a_plain_float_model_exports_unchanged(tmp_path):
    net = ConvLinear().eval()
    result = export_onnx(net, torch.randn(1, 3, 8, 8), tmp_path / "float.onnx")
    assert result.layers == [] and result.parity.max_rel < 1e-6
    assert not any(n.op_type == "DequantizeLinear" for n in onnx.load(str(tmp_path / "float.onnx")).graph.node)


# ---- TensorRT's rules ---------------------------------------------------------------------------------------------


def _dq_model(scale, zero_point, axis=0, weight=True) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "s")]
    inputs = []
    if weight:
        inits.append(numpy_helper.from_array(np.ones((2, 3), np.int8), "w"))
    else:
        inputs.append(helper.make_tensor_value_info("w", onnx.TensorProto.INT8, [2, 3]))
    names = ["w", "s"]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(np.asarray(zero_point), "z"))
        names.append("z")
    node = helper.make_node("DequantizeLinear", names, ["y"], name="dq", axis=axis)
    out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    return helper.make_model(helper.make_graph([node], "g", inputs, [out], inits))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_dq_model([1.0, -1.0], np.zeros(2, np.int8)), "scales must be positive"),
        (_dq_model([1.0, 1.0], None), "no zero point"),
        (_dq_model([1.0, 1.0], np.zeros(2, np.uint8)), "zero point must be 0 of a signed type"),
        (_dq_model([1.0, 1.0], np.array([0, 1], np.int8)), "zero point must be 0"),
        (_dq_model([1.0, 1.0, 1.0], np.zeros(3, np.int8), axis=1), "axis is 1"),
        (_dq_model([1.0, 1.0], np.zeros(2, np.int8), weight=False), "only on constant weights"),
    ],
    ids=["negative-scale", "no-zero-point", "uint8", "nonzero", "axis-1", "per-channel-activation"],
)
def test_the_rule_checker_names_what_tensorrt_would_refuse(model, message):
    with pytest.raises(QuantizationRuleError, match=message):
        check_explicit_quantization(model)


# ---- errors leave no file ----------------------------------------------------------------------------------------


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_model_that_does_not_export_is_a_clear_error_and_leaves_no_file(tmp_path):
    class Bessel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.special.bessel_j0(self.conv(x))

    net = Bessel()
    attach_quantizers(net)
    (tmp_path / "net.onnx").write_bytes(b"the previous export")
    with pytest.raises(ExportError, match=r"could not export Bessel on the example input \(a float32 tensor of shape .*aten::special_bessel_j0"):
        export_onnx(net, torch.randn(1, 3, 4, 4), tmp_path / "net.onnx")
    assert leftovers(tmp_path) == ["net.onnx"] and (tmp_path / "net.onnx").read_bytes() == b"the previous export"
    assert type(net.conv).__name__ == "QuantizedConv2d", "the model is given back as it was"


def test_an_output_path_that_cannot_be_written_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ExportError, match="Cannot write the ONNX file .*file/net.onnx"):
        export_onnx(ConvLinear(), torch.randn(1, 3, 8, 8), tmp_path / "file" / "net.onnx")


def test_parity_past_the_tolerance_is_a_clear_error_and_leaves_no_file(tmp_path):
    net = ConvLinear()
    attach_quantizers(net)
    batches = [torch.randn(4, 3, 8, 8)]
    with pytest.raises(ParityError, match="past the tolerance 1e-06; no file was written"):
        export_onnx(net, batches[0], tmp_path / "net.onnx", calibration=batches, tolerance=1e-6,
                    float_path=tmp_path / "net.float.onnx")  # fmt: skip
    assert leftovers(tmp_path) == [], "neither the file nor its float copy"
    with pytest.raises(ExportError, match="float32 model"):
        export_onnx(ConvLinear().double(), torch.randn(1, 3, 8, 8, dtype=torch.float64), tmp_path / "net.onnx")


def optimized_ops(path, tmp_path) -> list[str]:
    """The ops ONNX Runtime runs for the file in a default session (its optimized graph, read back)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def test_a_default_onnx_runtime_session_folds_weight_only_dequantization_at_load(tmp_path):
    net = ConvLinear()
    attach_quantizers(net)
    x = torch.randn(2, 3, 8, 8)
    export_onnx(net, x, tmp_path / "weights.onnx", float_path=tmp_path / "float.onnx")
    assert {"Cast", "Mul"} <= {n.op_type for n in onnx.load(str(tmp_path / "weights.onnx")).graph.node}
    assert optimized_ops(tmp_path / "weights.onnx", tmp_path) == optimized_ops(tmp_path / "float.onnx", tmp_path), (
        "the int8 weights become float weights once, at load: the same kernels as the float file"
    )
    export_onnx(net, x, tmp_path / "activations.onnx", calibration=[x], tolerance=None)
    assert "DequantizeLinear" in optimized_ops(tmp_path / "activations.onnx", tmp_path), "Q/DQ kept for int8 kernels"


def test_calibrating_a_model_without_quantized_layers_is_a_clear_error(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ExportError, match="no quantized layer to calibrate"):
        export_onnx(ConvLinear(), x, tmp_path / "net.onnx", calibration=[x], tolerance=None)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_a_model_without_one_tensor_output_is_a_clear_error(kind, tmp_path):
    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return (y, y.mean()) if kind == "tuple" else {"logits": y}

    net = TwoOutputs()
    attach_quantizers(net)
    with pytest.raises(TypeError, match=f"TwoOutputs returns a {kind}; export supports a model with one tensor output"):
        export_onnx(net, torch.randn(1, 3, 4, 4), tmp_path / "net.onnx")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_written_files_have_the_permissions_the_umask_gives(umask, tmp_path):
    net = ConvLinear()
    attach_quantizers(net)
    old = os.umask(umask)
    try:
        export_onnx(net, torch.randn(1, 3, 8, 8), tmp_path / "net.onnx", float_path=tmp_path / "new" / "float.onnx")
        write_json(tmp_path / "net.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("net.onnx", "new/float.onnx", "net.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["float.onnx", "net.json", "net.onnx", "new"]


def test_a_torchvision_resnet_runs_every_conv_but_the_first_as_an_integer_kernel(tmp_path):
    """The last block's Add reaches the classifier through a ReLU and a global average pooling, which keep its sign:
    it is quantized like the other Adds, so the last convolution ends in an integer kernel too."""
    net = torchvision.models.resnet18(num_classes=10).eval()
    attach_quantizers(net, QuantizationConfig(init_bits=6))
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    export_onnx(net, batches[0], tmp_path / "net.onnx", calibration=batches, tolerance=0.1, runtime="onnxruntime")
    ops = optimized_ops(tmp_path / "net.onnx", tmp_path)
    assert ops.count("QLinearConv") == 19 and ops.count("Conv") == 1, f"all 20 but the one on the image: {ops}"
