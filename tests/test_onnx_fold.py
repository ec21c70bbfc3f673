"""BatchNorm folded into the exported convolutions' scales and biases: integers untouched, outputs to round-off, and
left alone where a fold would not be exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from lightning_selfcompress.core.export import export_onnx, integer_weights, stored_weights
from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers, quantized_layers
from lightning_selfcompress.models import BaselineCNN, ResNet9


def trained_statistics(net: nn.Module, seed: int = 0, negative: bool = False) -> nn.Module:
    """BatchNorm parameters and running statistics far from their initial values, as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
                if negative:
                    m.weight[0] = -1.0
    return net.eval()


def batchnorm_nodes(path) -> int:
    return [n.op_type for n in onnx.load(str(path)).graph.node].count("BatchNormalization")


@pytest.mark.parametrize("make", [lambda: BaselineCNN(1, 10, width=8), lambda: ResNet9(1, 10, width=8)],
                         ids=["baseline_cnn (BN after ReLU)", "resnet9 (BN after conv)"])  # fmt: skip
def test_every_batchnorm_folds_and_the_integers_stay(make, tmp_path):
    torch.manual_seed(0)
    net = trained_statistics(make())
    attach_quantizers(net, QuantizationConfig(init_bits=4, init_scale="lsq"))
    x = torch.randn(16, 1, 28, 28)
    result = export_onnx(net, x, tmp_path / "net.onnx", tolerance=1e-5)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert len(result.folded_batchnorm) == norms and batchnorm_nodes(tmp_path / "net.onnx") == 0
    assert result.parity.max_rel <= 1e-5
    stored = {output.removesuffix(".weight_dequantized"): ints for output, (ints, _) in
              stored_weights(onnx.load(str(tmp_path / "net.onnx"))).items()}  # fmt: skip
    for name, module in quantized_layers(net).items():
        assert np.array_equal(stored[name], integer_weights(module)[0].numpy()), f"{name}: the integers it trained with"


def test_a_negative_factor_or_a_padded_next_convolution_keeps_the_batchnorm(tmp_path):
    torch.manual_seed(0)
    negative = trained_statistics(BaselineCNN(1, 10, width=8), negative=True)
    padded = trained_statistics(
        nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1))
    )
    for name, net in (("negative", negative), ("padded", padded)):
        attach_quantizers(net, QuantizationConfig(init_bits=4, init_scale="lsq"))
        result = export_onnx(net, torch.randn(4, 1, 28, 28), tmp_path / f"{name}.onnx", tolerance=1e-5)
        norms = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
        assert result.folded_batchnorm == [] and batchnorm_nodes(tmp_path / f"{name}.onnx") == norms, name
        assert result.parity.max_rel <= 1e-5


def test_a_branchs_reembedding_folds_into_its_last_convolution_with_zero_rows(tmp_path):
    """A cut from one residual branch alone re-embeds its output (Concat with zeros, Gather); in the file the branch's
    last convolution writes the stream's width itself: its integers gathered, zero rows (no bits) where it has no
    channel, and the same function."""
    from lightning_selfcompress.core.export import stored_weight_bits
    from lightning_selfcompress.core.groups import ChannelGraph
    from lightning_selfcompress.core.quant import integer_bits
    from lightning_selfcompress.core.reembed import reembedding_of
    from lightning_selfcompress.core.surgery import Removal, Surgeon
    from lightning_selfcompress.testing import choose_branch_channels, kill_branch_channels

    torch.manual_seed(0)
    net = trained_statistics(ResNet9(1, 10, width=8))
    attach_quantizers(net, QuantizationConfig(init_bits=4, init_scale="lsq"))
    x = torch.randn(8, 1, 28, 28)
    graph = ChannelGraph(net, x[:2])
    cuts = choose_branch_channels(graph, 0.5, seed=1)
    kill_branch_channels(graph, cuts)
    Surgeon(graph).remove(Removal(torch.zeros(graph.num_groups, dtype=torch.bool), cuts=cuts))
    tails = {"layer1.2.res2.0": 16, "layer3.2.res2.0": 64}  # the stream's widths
    assert all(net.get_submodule(name).out_channels < width for name, width in tails.items()), "both branches cut"

    result = export_onnx(net, x, tmp_path / "net.onnx", tolerance=1e-5)
    model = onnx.load(str(tmp_path / "net.onnx"))
    assert not {"Gather", "Concat"} & {n.op_type for n in model.graph.node}, "no re-embedding left in the file"
    assert result.parity.max_rel <= 1e-5
    stored = {output.removesuffix(".weight_dequantized"): ints for output, (ints, _) in stored_weights(model).items()}
    for name, width in tails.items():
        ints = integer_weights(net.get_submodule(name))[0].numpy()
        branch = net.get_submodule(name.removesuffix(".0"))
        gather = next(reembedding_of(m) for m in branch.modules() if reembedding_of(m) is not None).numpy()
        expected = np.concatenate([ints, np.zeros_like(ints[:1])])[gather]
        assert stored[name].shape[0] == width and np.array_equal(stored[name], expected), name
    counted = sum(int((integer_bits(integer_weights(m)[0]) * m.weight[0].numel()).sum())
                  for m in quantized_layers(net).values())  # fmt: skip
    assert result.weight_bits == stored_weight_bits(model) == counted, "the zero rows store no bits"


def test_a_constant_factor_on_the_classifiers_output_folds_into_its_scale(tmp_path):
    """ResNet-9 scales its logits by 0.125: in the file the classifier's scale takes the factor, its integers stay."""
    torch.manual_seed(0)
    net = trained_statistics(ResNet9(1, 10, width=4))
    attach_quantizers(net, QuantizationConfig(init_bits=4, init_scale="lsq"))
    result = export_onnx(net, torch.randn(4, 1, 28, 28), tmp_path / "net.onnx", tolerance=1e-5)
    model = onnx.load(str(tmp_path / "net.onnx"))
    assert "Mul" not in [n.op_type for n in model.graph.node if not n.name.endswith(".dequantize")], "no factor left"
    ints, scale = stored_weights(model)["linear.weight_dequantized"]
    expected_ints, expected_scale = (t.numpy() for t in integer_weights(net.linear))
    assert np.array_equal(ints, expected_ints)
    np.testing.assert_allclose(scale.flatten(), expected_scale.flatten() * 0.125, rtol=1e-6)
    assert result.parity.max_rel <= 1e-5
