"""The quantizer against a float64 reference, its gradients, and attaching it to real networks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lightning_selfcompress.core.quant import (
    QuantizationConfig,
    QuantizedConv2d,
    attach_quantizers,
    quantize,
    quantized_layers,
    quantizer_parameters,
)
from lightning_selfcompress.models import BaselineCNN, ResNet9


OFFSET = {"integer": 0.0, "midrise": 0.5}


def reference(w: np.ndarray, b: np.ndarray, e: np.ndarray, grid: str = "integer") -> np.ndarray:
    """The paper's formula (or its mid-rise form) in float64 numpy, with b clamped at 0 and b <= 0 channels zero."""
    shape = (-1,) + (1,) * (w.ndim - 1)
    b, e, half = np.maximum(b, 0).reshape(shape), e.reshape(shape), OFFSET[grid]
    q = 2.0**e * (np.round(np.clip(2.0**-e * w - half, -(2.0 ** (b - 1)), 2.0 ** (b - 1) - 1)) + half)
    return np.where(b > 0, q, 0.0)


def random_case(shape=(12, 5, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    b = torch.empty(shape[0], dtype=torch.float64).uniform_(-2, 9, generator=g)
    e = torch.empty(shape[0], dtype=torch.float64).uniform_(-8, 0, generator=g)
    return w, b, e


@pytest.mark.parametrize("grid", ["integer", "midrise"])
@pytest.mark.parametrize("shape", [(12, 5, 3, 3), (7, 9), (6, 4, 5), (5, 2, 3, 3, 3)])
@pytest.mark.parametrize("seed", range(3))
def test_values_match_float64_reference(shape, seed, grid):
    w, b, e = random_case(shape, seed)
    expected = reference(w.numpy(), b.numpy(), e.numpy(), grid)
    # exp2 in torch and numpy may differ in the last bit; the rounding itself must agree everywhere
    np.testing.assert_allclose(quantize(w, b, e, grid).numpy(), expected, rtol=1e-14, atol=0)


def test_the_midrise_grid_is_symmetric_and_one_bit_is_binary():
    w = torch.tensor([[-5.0, -0.2, 0.3, 4.0], [-5.0, -0.2, 0.3, 4.0], [-5.0, -0.2, 0.3, 4.0]])
    q = quantize(w, torch.tensor([1.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 1.0]), "midrise")
    assert q.tolist() == [[-1.0, -1.0, 1.0, 1.0], [-3.0, -1.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="grid='ternary' is not one of"):
        quantize(w, torch.ones(3), torch.ones(3), "ternary")


def test_values_are_integers_times_the_scale_within_the_bit_range():
    w, b, e = random_case((32, 16))
    q = quantize(w, b, e)
    scale = torch.exp2(e)[:, None]
    ints = torch.round(q / scale)
    assert torch.equal(ints * scale, q), "integer codes times the scale must give back the weights exactly"
    high = torch.exp2(b.clamp_min(0) - 1)[:, None]
    assert (ints >= torch.round(-high)).all() and (ints <= torch.round(high - 1)).all()


def test_nonpositive_bits_give_exact_zeros_and_no_gradient():
    w, b, e = random_case((8, 4, 3, 3))
    b[:4] = torch.tensor([0.0, -0.5, -3.0, 0.0], dtype=torch.float64)
    w, b, e = (t.clone().requires_grad_() for t in (w, b, e))
    q = quantize(w, b, e)
    assert (q[:4] == 0).all()
    (q * torch.randn_like(q)).sum().backward()
    assert (b.grad[:4] == 0).all() and (e.grad[:4] == 0).all() and (w.grad[:4] == 0).all()
    assert w.grad[4:].abs().sum() > 0


def test_fractional_bits_below_one_still_hold_minus_scale():
    """0 < b < 1: the range [-2^(b-1), 2^(b-1)-1] lies in [-1, 0), so values are -2^e or 0 (DESIGN.md trap)."""
    w = torch.tensor([[-5.0, -0.2, 0.3, 4.0]])
    q = quantize(w, torch.tensor([0.5]), torch.tensor([0.0]))
    assert set(q.flatten().tolist()) <= {-1.0, 0.0} and q[0, 0] == -1.0


def surrogate(w, b, e, residual, grid="integer"):
    """What the straight-through estimator differentiates: the rounding residual held fixed, so smooth."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    bb, ee, half = b.relu().reshape(shape), e.reshape(shape), OFFSET[grid]
    high = torch.exp2(bb - 1)
    clamped = torch.clamp(torch.exp2(-ee) * w - half, -high, high - 1)
    return torch.where(bb > 0, torch.exp2(ee) * (clamped + residual + half), 0.0)


def rounding_residual(w, b, e, grid="integer"):
    shape = (-1,) + (1,) * (w.dim() - 1)
    high = torch.exp2(b.relu().reshape(shape) - 1)
    clamped = torch.clamp(torch.exp2(-e.reshape(shape)) * w - OFFSET[grid], -high, high - 1)
    return torch.round(clamped) - clamped


def test_gradients_match_finite_differences_of_the_straight_through_surrogate():
    w, b, e = random_case((10, 6), seed=4)
    b = b.clamp(0.5, 6)  # smooth region of relu
    probe = torch.randn(10, 6, dtype=torch.float64)
    params = [t.clone().requires_grad_() for t in (w, b, e)]
    (quantize(*params) * probe).sum().backward()
    residual = rounding_residual(w, b, e)
    assert torch.equal(surrogate(w, b, e, residual), quantize(w, b, e))
    eps = 1e-6
    for index, param in enumerate(params):
        base = [t.detach().clone() for t in params]
        numeric = torch.zeros_like(param)
        flat = numeric.view(-1)
        for i in range(flat.numel()):
            plus, minus = [t.clone() for t in base], [t.clone() for t in base]
            plus[index].view(-1)[i] += eps
            minus[index].view(-1)[i] -= eps
            flat[i] = ((surrogate(*plus, residual) - surrogate(*minus, residual)) * probe).sum() / (2 * eps)
        torch.testing.assert_close(param.grad, numeric, rtol=1e-5, atol=1e-7)
    assert params[1].grad.abs().sum() > 0, "some weights are clipped, so b must get a gradient"


def test_gradient_reaches_weights_only_inside_the_clamp_range():
    w = torch.tensor([[0.1, 0.9, 3.0, -3.0]], requires_grad=True)
    q = quantize(w, torch.tensor([2.0]), torch.tensor([-1.0]))  # range [-2, 1] * 0.5 = [-1, 0.5]
    q.sum().backward()
    assert w.grad.tolist() == [[1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("make", [lambda: BaselineCNN(), lambda: ResNet9(in_channels=1, width=8)])
def test_default_init_starts_within_two_percent_of_the_float_model(make):
    net = make().eval()
    x = torch.randn(8, 1, 28, 28)
    quantized = copy.deepcopy(net)
    attach_quantizers(quantized)
    float_out, q_out = net(x), quantized.eval()(x)
    assert (q_out - float_out).norm() / float_out.norm() < 0.02
    assert not torch.equal(q_out, float_out), "the quantizer must be in the forward path"


def test_attach_keeps_modules_and_parameters_and_a_readable_state_dict():
    net = BaselineCNN(width=4)
    conv = net.features[0]
    weight = conv.weight
    layers = attach_quantizers(net)
    assert net.features[0] is conv and conv.weight is weight and isinstance(conv, nn.Conv2d)
    assert type(conv) is QuantizedConv2d
    assert list(layers) == ["features.0", "features.2", "features.6", "features.8", "classifier"]
    keys = set(net.state_dict())
    assert {"features.0.weight", "features.0.weight_quantizer.bits", "features.0.weight_quantizer.exponent"} <= keys
    assert net.state_dict()["features.0.weight_quantizer.bits"].shape == (4,)
    assert len(quantizer_parameters(net)) == 10
    again = attach_quantizers(net)  # idempotent: a second setup() must not stack quantizers
    assert list(again) == list(layers) and not hasattr(conv.weight_quantizer, "weight_quantizer")


def test_the_grid_travels_in_the_state_dict_and_older_checkpoints_load_as_integer():
    trained = BaselineCNN(width=4)
    attach_quantizers(trained, QuantizationConfig(grid="midrise"))
    state = trained.state_dict()
    assert state["features.0.weight_quantizer.midrise"].item() is True
    fresh = BaselineCNN(width=4)
    attach_quantizers(fresh)  # built with the default grid: the checkpoint decides
    fresh.load_state_dict(state)
    x = torch.randn(2, 1, 28, 28)
    assert fresh.features[0].weight_quantizer.grid == "midrise" and torch.equal(fresh(x), trained(x))
    older = {k: v for k, v in state.items() if not k.endswith(".midrise")}  # written before the grid existed
    fresh.load_state_dict(older)
    assert {m.weight_quantizer.grid for m in quantized_layers(fresh).values()} == {"integer"}


def test_filters_select_layers_by_type_and_name():
    net = ResNet9(in_channels=1, width=4)
    layers = attach_quantizers(net, QuantizationConfig(layer_types=("Conv2d",), exclude=("prep.*", "layer3.*")))
    assert "linear" not in layers and not any(n.startswith(("prep", "layer3")) for n in layers)
    assert "layer1.0.0" in layers and "layer2.0.0" in layers


def test_subclasses_are_left_alone():
    """MultiheadAttention reads out_proj.weight itself: quantizing its forward would silently do nothing."""
    attention = nn.MultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="selects none.*out_proj.*exact types"):
        attach_quantizers(nn.Sequential(attention), QuantizationConfig(layer_types=("Linear",)))


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/Conv3d/Linear layer"):
        attach_quantizers(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match=r"selects none of the layers \['0', '2'\]"):
        attach_quantizers(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)), QuantizationConfig(include=("fc*",)))
    wrapped = nn.Module()
    wrapped.net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"exclude pattern '0' matches no module of Module: did you mean \['net.0'\]"):
        attach_quantizers(wrapped, QuantizationConfig(exclude=("0",)))
    assert quantized_layers(wrapped) == {}  # checked before any layer changes
    with pytest.raises(ValueError, match="layer_types.*'Conv4d'"):
        QuantizationConfig(layer_types=("Conv4d",))
    with pytest.raises(ValueError, match="init_bits=nan"):
        QuantizationConfig(init_bits=float("nan"))
    with pytest.raises(ValueError, match="init_exponent=inf"):
        QuantizationConfig(init_exponent=float("inf"))
    with pytest.raises(ValueError, match="init_bits=0"):
        QuantizationConfig(init_bits=0)
    with pytest.raises(ValueError, match=r"grid='mid-rise' is not one of \['integer', 'midrise'\]"):
        QuantizationConfig(grid="mid-rise")


def test_quantized_layers_finds_attached_layers_only():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 1))
    assert quantized_layers(net) == {}
    attach_quantizers(net, QuantizationConfig(include=("1",)))
    assert list(quantized_layers(net)) == ["1"]


@pytest.mark.parametrize("grid", ["integer", "midrise"])
@pytest.mark.parametrize("seed", range(4))
def test_fused_gradients_equal_autograd_through_the_composite_formula(seed, grid):
    w, b, e = random_case((16, 8, 3, 3), seed)  # b in [-2, 9): dead, fractional and clipped channels
    probe = torch.randn_like(w)
    ours = [t.clone().requires_grad_() for t in (w, b, e)]
    (quantize(*ours, grid) * probe).sum().backward()
    composite = [t.clone().requires_grad_() for t in (w, b, e)]
    (surrogate(*composite, rounding_residual(w, b, e, grid), grid) * probe).sum().backward()
    for mine, theirs in zip(ours, composite):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Conv1d(4, 6, 3, padding=1), torch.randn(2, 4, 9)),
        (nn.Conv2d(6, 6, 3, groups=6), torch.randn(2, 6, 7, 7)),  # depthwise
        (nn.Conv2d(8, 4, 1, groups=2), torch.randn(2, 8, 5, 5)),  # grouped
        (nn.Conv3d(2, 3, 2), torch.randn(1, 2, 4, 4, 4)),
        (nn.Linear(5, 7), torch.randn(3, 5)),
    ],
    ids=["conv1d", "depthwise", "grouped", "conv3d", "linear"],
)
def test_every_layer_kind_computes_with_its_quantized_weight(layer, x):
    float_layer = copy.deepcopy(layer)
    attach_quantizers(nn.Sequential(layer), QuantizationConfig(init_bits=3))
    q = layer.weight_quantizer
    assert q.bits.shape == q.exponent.shape == (layer.weight.shape[0],)
    float_layer.weight.data = quantize(layer.weight, q.bits, q.exponent).detach()
    torch.testing.assert_close(layer(x), float_layer(x), rtol=0, atol=0)
    assert not torch.equal(layer.weight, float_layer.weight), "3 bits must change the weights"


def test_a_layer_whose_weight_a_function_reads_stays_float(tmp_path):
    """Swin's attention passes `qkv.weight` and `proj.weight` to a function and never calls those Linears: quantized,
    their bits would move nothing PyTorch computes while the file held the quantized weights (two SGD steps in, the
    export was 0.14% off and refused at its default 1e-4). They stay float, said; named in `include`, as a checkpoint
    names its layers, they are quantized as before."""
    import torchvision

    from lightning_selfcompress.core.export import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10)
    with pytest.warns(UserWarning, match=r"24 layer\(s\) stay float: the model reads their weight without calling"):
        layers = attach_quantizers(model)
    assert "features.1.0.attn.qkv" not in layers and "features.1.0.mlp.0" in layers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        loss = nn.functional.cross_entropy(model.train()(torch.randn(4, 3, 64, 64)), torch.randint(0, 10, (4,)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    export_onnx(model.eval(), torch.randn(2, 3, 64, 64), tmp_path / "swin.onnx")  # parity within 1e-4, else it raises
    named = torchvision.models.swin_t(num_classes=10)
    assert "features.1.0.attn.qkv" in attach_quantizers(named, QuantizationConfig(include=("features.1.0.attn.qkv",)))
