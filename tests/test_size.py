"""Size accounting against hand-counted models, the live-input refinement, and the gamma schedule."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers, integer_bits, integer_weights
from lightning_selfcompress.core.size import GammaSchedule, SizeModel, float_size_report, input_sources
from lightning_selfcompress.core.surgery import Surgeon
from lightning_selfcompress.models import BaselineCNN, ResNet9


class Small(nn.Module):
    """conv 2->4 3x3, grouped conv 4->6 3x3 (2 groups), flatten 6x2x2 into a Linear 24->3, on 6x6 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3, groups=2)
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def set_bits(model, **bits):
    for name, values in bits.items():
        model.get_submodule(name).weight_quantizer.bits.data = torch.tensor(values)


def test_hand_counted_grouped_model_with_live_inputs():
    model = Small()
    attach_quantizers(model)
    set_bits(model, conv1=[2.0, 0.0, 3.0, -1.0], conv2=[1.0, 2.0, 0.0, 4.0, 1.5, 2.0], fc=[3.0, 1.0, 2.0])
    report = SizeModel(model, torch.randn(2, 2, 6, 6)).report()
    by_name = {layer.name: layer for layer in report.layers}
    # conv1: every input live, 2 inputs x 9 = 18 weights per channel; channels 1 and 3 are dead
    assert by_name["conv1"].bits == (2 + 3) * 18 and by_name["conv1"].weights_kept == 2 * 18
    # conv2: each group sees one live input channel (conv1's 0 in group 0, 2 in group 1): 9 weights per channel
    assert by_name["conv2"].bits == (1 + 2 + 0 + 4 + 1.5 + 2) * 9 and by_name["conv2"].weights_kept == 5 * 9
    # fc: conv2's dead channel 2 removes its 2x2 = 4 flattened features: 20 live inputs
    assert by_name["fc"].bits == (3 + 1 + 2) * 20 and by_name["fc"].weights_kept == 3 * 20
    widths = integer_bits(integer_weights(model.conv2)[0])  # the integers' own widths, at most ceil(b)
    assert widths[2] == 0 and all(w <= math.ceil(b) for w, b in zip(widths.tolist(), [1.0, 2.0, 0.0, 4.0, 1.5, 2.0]))
    assert by_name["conv2"].deployable_bits == int(widths.sum()) * 9
    assert report.bits == 90 + 94.5 + 120
    assert report.float_weights == 72 + 108 + 72
    assert report.bits_per_weight == pytest.approx(304.5 / 252)
    assert report.size_bytes == math.ceil(304.5 / 8) and report.float32_bytes == 4 * 252
    assert report.channels_alive == 2 + 5 + 3 and report.channels == 13
    assert report.percent_of_float32 == pytest.approx(100 * 304.5 / (32 * 252))


def test_size_gradient_is_the_live_weight_count_per_channel():
    model = Small()
    attach_quantizers(model)
    set_bits(model, conv1=[2.0, 0.0, 3.0, -1.0], conv2=[1.0, 2.0, 0.0, 4.0, 1.5, 2.0], fc=[3.0, 1.0, 2.0])
    SizeModel(model, torch.randn(2, 2, 6, 6)).bits().backward()
    assert model.conv1.weight_quantizer.bits.grad.tolist() == [18.0, 0.0, 18.0, 0.0]
    assert model.conv2.weight_quantizer.bits.grad.tolist() == [9.0, 9.0, 0.0, 9.0, 9.0, 9.0]
    assert model.fc.weight_quantizer.bits.grad.tolist() == [20.0, 20.0, 20.0]


def test_baseline_cnn_flatten_into_1x1_conv_counts_nine_features_per_channel():
    model = BaselineCNN(width=4)
    attach_quantizers(model)
    size = SizeModel(model, torch.randn(2, 1, 28, 28))
    full = size.report()
    model.features[8].weight_quantizer.bits.data[3] = 0.0
    cut = {layer.name: layer for layer in size.report().layers}
    assert cut["classifier"].weights_kept == 10 * (72 - 9)
    assert cut["features.8"].weights_kept == 7 * 8 * 9
    assert full.weights_kept - size.report().weights_kept == 10 * 9 + 8 * 9


def test_resnet9_residual_input_is_dead_only_when_both_producers_are():
    model = ResNet9(in_channels=1, width=4)
    attach_quantizers(model)
    size = SizeModel(model, torch.randn(2, 1, 28, 28))
    kept = lambda: {layer.name: layer.weights_kept for layer in size.report().layers}["layer2.0.0"]  # noqa: E731
    full = kept()
    model.get_submodule("layer1.0.0").weight_quantizer.bits.data[5] = 0.0
    assert kept() == full, "the residual branch still feeds channel 5"
    model.get_submodule("layer1.2.res2.0").weight_quantizer.bits.data[5] = -1.0
    assert kept() == full - 16 * 9


def test_a_channel_cut_from_a_residual_branch_alone_leaves_the_size_as_it_was():
    model = ResNet9(in_channels=1, width=4)  # layer1: 8 channels, the residual's res2 adds into them
    attach_quantizers(model)
    branch, bn, stream, stream_bn = (model.get_submodule(n) for n in ("layer1.2.res2.0", "layer1.2.res2.1", "layer1.0.0", "layer1.0.1"))
    with torch.no_grad():
        branch.weight_quantizer.bits[[6, 7]] = 0.0
        bn.bias[[6, 7]] = 0.0  # the branch adds relu(0) = 0 for them
        stream.weight_quantizer.bits[7] = 0.0
        stream_bn.bias[7] = 0.5  # channel 7 is dead (a constant) but not zero: it stays in the stream
    x = torch.randn(2, 1, 28, 28)
    surgeon = Surgeon(ChannelGraph(model, x))
    surgeon.settle_statistics()
    before = SizeModel(model, x).report()
    surgeon.remove(surgeon.find())
    assert branch.out_channels == 6 and stream.out_channels == 8
    after = SizeModel(model, x).report()  # the branch re-embedded: followed through its zeros
    assert (after.weights_kept, after.bits) == (before.weights_kept, before.bits)


def test_concat_offsets_and_unquantized_producers():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 3, 1), nn.Conv2d(1, 2, 1), nn.Conv2d(5, 4, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], dim=1))

    model = Cat()
    attach_quantizers(model, QuantizationConfig(exclude=("a",)))
    size = SizeModel(model, torch.randn(2, 1, 4, 4))
    model.b.weight_quantizer.bits.data[1] = 0.0  # channel 3 + 1 = 4 of c's input
    assert {layer.name: layer.weights_kept for layer in size.report().layers}["c"] == 4 * 4


def test_untraceable_model_counts_every_input_as_live():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.b(h if h.sum() > 0 else -h)

    model = Branchy()
    attach_quantizers(model)
    with pytest.warns(UserWarning, match="cannot follow the channels of Branchy: torch.fx cannot trace.*upper bound"):
        size = SizeModel(model, torch.randn(2, 4))
    model.a.weight_quantizer.bits.data[:] = 0.0
    assert {layer.name: layer.weights_kept for layer in size.report().layers}["b"] == 8


def test_without_an_example_input_every_input_counts_as_live_with_a_warning():
    model = Small()
    attach_quantizers(model)
    set_bits(model, conv1=[2.0, 0.0, 3.0, -1.0])
    with pytest.warns(UserWarning, match=r"no example input was given \(SizeModel\(model, example_input.*upper bound"):
        size = SizeModel(model)
    followed = SizeModel(model, torch.randn(2, 2, 6, 6))
    assert size.report().weights_kept == followed.report().weights_kept + 6 * 9, "conv1's 2 dead channels"


def test_float_report_counts_32_bits_per_weight():
    report = float_size_report(BaselineCNN())
    assert report.float_weights == 800 + 25600 + 18432 + 36864 + 5760
    assert report.bits_per_weight == 32 and report.percent_of_float32 == 100


def test_size_model_needs_quantizers():
    with pytest.raises(ValueError, match="no quantized layer"):
        SizeModel(Small())


def test_gamma_warmup_ramps_linearly():
    schedule = GammaSchedule(gamma=0.1, warmup_steps=4)
    values = []
    for _ in range(6):
        values.append(schedule.value(5.0))
        schedule.step += 1
    assert values == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_budget_switches_the_size_term_off_at_or_below_the_target():
    schedule = GammaSchedule(gamma=0.1, target_bits_per_weight=2.0)
    assert schedule.value(2.5) == 0.1 and schedule.value(2.0) == 0.0 and schedule.value(1.2) == 0.0
    restored = GammaSchedule(gamma=0.1, target_bits_per_weight=2.0)
    schedule.step = 7
    restored.load_state_dict(schedule.state_dict())
    assert restored.step == 7


def test_a_budget_band_makes_gamma_proportional_to_the_distance_both_ways_under_the_budget():
    schedule = GammaSchedule(gamma=0.2, target_bits_per_weight=1.0, band=0.1)
    values = [schedule.value(bits) for bits in (1.5, 1.0, 0.95, 0.9, 0.85, 0.8, 0.5)]
    assert values == pytest.approx([0.2, 0.2, 0.1, 0.0, -0.1, -0.2, -0.2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gamma=-0.1), "gamma=-0.1 must be a finite number >= 0"),
        (dict(gamma=float("nan")), "gamma=nan"),
        (dict(gamma=0.1, warmup_steps=-1), "gamma_warmup_steps=-1"),
        (dict(gamma=0.1, target_bits_per_weight=0.0), "target_bits_per_weight=0.0 must be a finite number > 0"),
        (dict(gamma=0.1, target_bits_per_weight=float("inf")), "target_bits_per_weight=inf"),
        (dict(gamma=0.1, target_bits_per_weight=1.0, band=1.0), "budget_band=1.0 must be in"),
    ],
)
def test_bad_schedules_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GammaSchedule(**kwargs)


def test_a_two_four_sparse_layer_counts_kept_weights_and_their_two_bit_indices():
    from lightning_selfcompress.core.sparsity import attach_masks

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 4))
    net(torch.randn(1, 3, 8, 8))
    attach_quantizers(net, QuantizationConfig(init_bits=4.0))
    x = torch.randn(2, 3, 8, 8)
    dense = SizeModel(net, x).report()
    attach_masks(net)  # layers 2 and 4 (8 and 256 inputs); the 3-input stem stays dense
    size = SizeModel(net, x)
    sparse = size.report()
    conv = {layer.name: layer for layer in sparse.layers}["2"]
    assert conv.weights_kept == 16 * 8 * 9 // 2
    assert conv.bits == pytest.approx((4 + 2) * conv.weights_kept), "b bits and a 2-bit index per kept weight"
    assert {layer.name: layer for layer in sparse.layers}["0"] == {layer.name: layer for layer in dense.layers}["0"]
    assert size.bits().item() == pytest.approx(sparse.bits)
    with torch.no_grad():
        net[2].weight_quantizer.bits[:4] = 0.0  # dead channels store nothing, not even indices
    assert {layer.name: layer for layer in size.report().layers}["2"].bits == pytest.approx(6 * 12 * 8 * 9 / 2)


def test_a_quantized_layer_whose_weight_the_model_reads_itself_is_refused_by_name():
    """attach_quantizers leaves such layers float by itself (test_quant); named whole in `include`, they are quantized,
    and the size model refuses them by name."""
    from torchvision.models.swin_transformer import SwinTransformer

    names = ["features.1.0.attn.qkv", "features.1.0.attn.proj", "features.3.0.attn.qkv", "features.3.0.attn.proj"]
    net = SwinTransformer([4, 4], 16, [1, 1], [2, 2], [2, 2], num_classes=10)  # attention gets qkv.weight, not qkv(x)
    attach_quantizers(net, QuantizationConfig(include=[*names, "features.1.0.mlp.0"]))
    listed = re.escape(str(names))
    with pytest.raises(ValueError, match=rf"reads the weight of the quantized layers {listed} itself.*exclude="):
        SizeModel(net, torch.randn(1, 3, 16, 16))
    net = SwinTransformer([4, 4], 16, [1, 1], [2, 2], [2, 2], num_classes=10)
    with pytest.warns(UserWarning, match="4 layer"):
        attach_quantizers(net)
    assert "features.1.0.mlp.0" in SizeModel(net, torch.randn(1, 3, 16, 16)).layers


def test_the_size_table_is_not_cut_to_80_columns_without_a_terminal(capsys):
    from lightning_selfcompress.report import print_size_table

    net = nn.Sequential()
    net.add_module("a_convolution_whose_name_alone_is_longer_than_forty_characters", nn.Conv2d(3, 4, 3))
    attach_quantizers(net)
    print_size_table(SizeModel(net, torch.randn(1, 3, 5, 5)).report(), title="size")
    out = capsys.readouterr().out  # pytest's capture is not a terminal
    assert "a_convolution_whose_name_alone_is_longer_than_forty_characters" in out and "…" not in out


@pytest.mark.parametrize(
    "middle, followed",
    [(nn.Softplus(), True), (nn.Dropout2d(), True), (nn.GroupNorm(4, 4), True), (nn.GroupNorm(2, 4), False)],
    ids=["softplus", "dropout2d", "groupnorm-per-channel", "groupnorm-across-channels"],
)
def test_size_accounting_follows_the_ops_surgery_follows_and_no_others(middle, followed):
    """One walker for both: what keeps each channel in place is followed, a GroupNorm over several channels is not (a dead channel's output there depends on the others: its consumer's weights stay counted)."""
    net = nn.Sequential(nn.Conv2d(3, 4, 1), middle, nn.Conv2d(4, 2, 1))
    expected = [frozenset({("0", i)}) if followed else None for i in range(4)]
    assert input_sources(net, torch.randn(2, 3, 4, 4))["2"] == expected
