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
