"""The channel graph, and function preservation of surgery on a zoo of real architectures."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_selfcompress.core.groups import ChannelGraph, GraphError
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.surgery import Removal, Surgeon
from lightning_selfcompress.models import BaselineCNN, ResNet9

from lightning_selfcompress.testing import (
    choose_branch_channels, choose_groups, kill_branch_channels, kill_groups, removable_groups,
)  # fmt: skip

from surgery_helpers import LARGE, ZOO, SmallNet, freeze_statistics, zoo_model


def test_groups_follow_residual_adds_flatten_and_pins():
    net = SmallNet(width=8)
    graph = ChannelGraph(net, torch.randn(2, 3, 8, 8))
    # the residual add ties the stem's channel i to the branch's channel i
    assert torch.equal(graph.outputs["stem"], graph.outputs["branch.0"])
    assert torch.equal(graph.members["bn"], graph.outputs["stem"])
    # flatten after a 2x2 pool: each of mid's channels becomes 4 consecutive features of the head
    assert torch.equal(graph.inputs["head"], graph.outputs["mid"].repeat_interleave(4))
    assert all(int(g) in graph.pinned for g in graph.outputs["head"]), "the model's outputs are pinned"
    assert graph.macs() == sum(m.weight.numel() * s for m, s in (
        (net.stem, 64), (net.branch[0], 64), (net.mid, 64), (net.head, 1)))  # fmt: skip


def test_a_grouped_convolution_ties_each_groups_inputs_and_outputs_and_loses_whole_groups():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, groups=4), nn.Conv2d(12, 4, 1))
    attach_quantizers(net)
    x = torch.randn(2, 3, 8, 8)
    graph = ChannelGraph(net, x[:1])
    assert torch.equal(graph.outputs["0"], graph.outputs["2"][::3].repeat_interleave(2))  # 2 in, 3 out per group
    group = int(graph.outputs["2"][3])  # the second convolution group
    with torch.no_grad():
        net[0].weight_quantizer.bits[2:4] = 0.0
        net[0].bias[2:4] = -1.0
        net[2].weight_quantizer.bits[3:6] = 0.0
        net[2].bias[3:6] = 0.0
    before = net(x)
    surgeon = Surgeon(graph)
    removal = surgeon.find()
    assert removal.groups.nonzero().flatten().tolist() == [group]
    surgeon.remove(removal)
    assert (net[0].out_channels, net[2].in_channels, net[2].out_channels, net[2].groups) == (6, 6, 9, 3)
    torch.testing.assert_close(net(x), before)


def test_depthwise_convolution_ties_input_and_output_channels():
    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 12, 3, groups=6), nn.Conv2d(12, 2, 1))
    graph = ChannelGraph(net, torch.randn(1, 3, 8, 8))
    assert torch.equal(graph.outputs["1"], graph.outputs["0"].repeat_interleave(2))


def test_split_and_cat_map_channels_by_offset():
    class SplitCat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(2, 3, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            left, right = self.a(x).split([4, 2], dim=1)
            return self.c(torch.cat([left[:, 1:], self.b(right), x[:, :0]], 1))

    graph = ChannelGraph(SplitCat(), torch.randn(1, 3, 4, 4))
    a, b = graph.outputs["a"], graph.outputs["b"]
    assert torch.equal(graph.inputs["b"], a[4:6])
    assert torch.equal(graph.inputs["c"], torch.cat([a[1:4], b]))
    assert {graph.pinned[int(g)] for g in a} == {"split into fixed sizes by node 'split'"}, "split([4, 2]) needs 6"


def test_a_split_along_the_height_constrains_no_channel():
    class Halves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            top, bottom = self.a(x).split(2, dim=2)
            return self.b(torch.cat([bottom, top], 2))

    graph = ChannelGraph(Halves(), torch.randn(1, 3, 4, 4))
    assert not any(int(g) in graph.pinned for g in graph.outputs["a"])
    assert len(set(graph.outputs["a"].tolist())) == 4, "no ties"


def test_chunks_lose_the_same_positions_and_stay_equal():
    class Chunks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            left, right = self.a(x).chunk(2, dim=1)
            return self.c(torch.cat([left, self.b(right)], 1))

    net, x = Chunks().double(), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    graph = ChannelGraph(net, x)
    assert torch.equal(graph.outputs["a"][:3], graph.outputs["a"][3:]), "channel j of each chunk goes together"
    killed = torch.zeros(graph.num_groups, dtype=torch.bool)
    killed[graph.outputs["a"][1]] = True
    kill_groups(graph, killed, bits=False)
    before = net(x)
    Surgeon(graph).remove(Removal(killed))
    assert net.a.out_channels == 4 and net.b.in_channels == 2
    torch.testing.assert_close(net(x), before)


def test_a_width_written_into_the_code_pins_its_channels():
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Linear(16, 2)

        def forward(self, x):
            return self.b(self.a(x).reshape(x.shape[0], 16))  # a literal 16: fewer channels would break it

    graph = ChannelGraph(Fixed(), torch.randn(1, 3, 2, 2))
    assert {graph.pinned[int(g)] for g in graph.outputs["a"]} == {"given a fixed width (16) by node 'reshape'"}


@pytest.mark.parametrize(
    "flatten",
    [lambda x: x.view(x.size(0), -1), lambda x: x.view(x.shape[0], -1), lambda x: x.reshape(x.size(0), -1),
     lambda x: torch.flatten(x, 1), lambda x: x.flatten(start_dim=1), nn.Flatten(),
     lambda x: x.contiguous().view(-1, x.shape[1] * x.shape[2] * x.shape[3])],
    ids=["view-size", "view-shape", "reshape-size", "torch-flatten", "flatten-kwarg", "nn-flatten", "view-minus-one"],
)
def test_the_flatten_idioms_users_write_are_followed_and_cut_exactly(flatten):
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 3), nn.Linear(6 * 16, 2)
            self.flatten = flatten if isinstance(flatten, nn.Module) else None

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(torch.relu(self.a(x)), 2)
            return self.b(self.flatten(x) if self.flatten is not None else flatten(x))

    net, x = Flat().double(), torch.randn(4, 3, 10, 10, dtype=torch.float64)
    graph = ChannelGraph(net, x[:2])
    assert torch.equal(graph.inputs["b"], graph.outputs["a"].repeat_interleave(16))
    killed = choose_groups(graph, 0.5)
    kill_groups(graph, killed, bits=False)
    before = net(x)
    Surgeon(graph).remove(Removal(killed))
    assert net.a.out_channels == 3 and net.b.in_features == 3 * 16
    torch.testing.assert_close(net(x), before)


def test_a_channel_shuffle_is_followed_and_cuts_the_same_place_in_every_group():
    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):  # torchvision's channel_shuffle, groups=2
            x = self.a(x)
            n, c, h, w = x.size()
            x = x.view(n, 2, c // 2, h, w)  # 2 written into the code, c // 2 computed at run time
            return self.b(torch.transpose(x, 1, 2).contiguous().view(n, -1, h, w))

    net, x = Shuffle().double(), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    graph = ChannelGraph(net, x)
    a = graph.outputs["a"]
    assert torch.equal(a[:3], a[3:]), "channel j of each shuffle group goes together"
    assert torch.equal(graph.inputs["b"], a[[0, 3, 1, 4, 2, 5]]), "b reads them interleaved"
    killed = torch.zeros(graph.num_groups, dtype=torch.bool)
    killed[a[1]] = True
    kill_groups(graph, killed, bits=False)
    before = net(x)
    Surgeon(graph).remove(Removal(killed))
    assert net.a.out_channels == net.b.in_channels == 4
    torch.testing.assert_close(net(x), before)


def test_untraceable_model_is_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(GraphError, match="torch.fx cannot trace DataDependent"):
        ChannelGraph(DataDependent(), torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize(
    ("forward", "message"),
    [
        (lambda self, x: self.b(torch.softmax(self.a(x), dim=1)), "'softmax' is not an op it knows"),
        (lambda self, x: self.b(self.a(x).sum(1, keepdim=True).expand(-1, 4, -1, -1)), "'sum' is not an op"),
        (lambda self, x: self.b(self.a(x).permute(0, 2, 1, 3)), r"a convolution on channels in dim 2 \(it reads"),
        (lambda self, x: self.b(self.a(x).view(x.shape[0], 2, -1, 4, 4)[:, 0]), "channels are moved out of dim 1"),
    ],
    ids=["softmax", "sum-over-channels", "permute", "split-view"],
)
def test_an_op_it_cannot_follow_is_a_clear_error_naming_the_node(forward, message):
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
            self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))

    Odd.forward = forward
    with pytest.raises(GraphError, match=message) as error:
        ChannelGraph(Odd(), torch.randn(1, 3, 4, 4))
    assert "node '" in str(error.value)


def test_a_per_channel_tensor_it_cannot_slice_keeps_those_channels_whole():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
            self.scale = nn.Parameter(torch.ones(4, 1, 1))  # ConvNeXt's layer scale

        def forward(self, x):
            return self.b(self.scale * self.a(x))

    graph = ChannelGraph(Scaled(), torch.randn(1, 3, 4, 4))
    assert {graph.pinned[int(g)] for g in graph.outputs["a"]} == {
        "scaled by a per-channel tensor it cannot slice at node 'mul'"
    }


def test_a_group_norm_with_one_channel_per_group_is_sliced_with_its_channels_and_keeps_that_form():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.GroupNorm(6, 6), nn.ReLU(), nn.Conv2d(6, 2, 1)).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    attach_quantizers(net)
    graph = ChannelGraph(net, x)
    killed = torch.zeros(graph.num_groups, dtype=torch.bool)
    killed[graph.outputs["0"][[1, 4]]] = True
    kill_groups(graph, killed)  # 0 bits and no shift: GroupNorm writes its shift 0 for a constant channel
    before = {mode: net.train(mode)(x).detach() for mode in (True, False)}
    surgeon = Surgeon(graph)
    assert torch.equal(surgeon.find().groups, killed)
    surgeon.remove(surgeon.find())
    assert net[1].num_channels == net[1].num_groups == net[3].in_channels == 4
    for mode in (True, False):
        torch.testing.assert_close(net.train(mode)(x), before[mode])


def test_channels_last_blocks_are_followed_and_their_hidden_units_cut_exactly():
    class ChannelsLast(nn.Module):  # ConvNeXt's block: depthwise conv, then LayerNorm and an MLP over channels last
        def __init__(self) -> None:
            super().__init__()
            self.dw, self.norm = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.LayerNorm(4)
            self.up, self.down, self.head = nn.Linear(4, 8), nn.Linear(8, 4), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.norm(self.dw(x).permute(0, 2, 3, 1))
            y = self.down(torch.nn.functional.gelu(self.up(y))).permute(0, 3, 1, 2)
            return self.head(x + y)

    net, x = ChannelsLast().double(), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    graph = ChannelGraph(net, x)
    assert all(int(g) in graph.pinned for g in graph.outputs["dw"]), "normalised across channels"
    assert torch.equal(graph.inputs["down"], graph.outputs["up"])
    assert torch.equal(graph.inputs["head"], graph.outputs["down"])
    killed = torch.zeros(graph.num_groups, dtype=torch.bool)
    killed[graph.outputs["up"][[2, 5]]] = True
    kill_groups(graph, killed, bits=False)
    before = net(x)
    Surgeon(graph).remove(Removal(killed))
    assert (net.up.out_features, net.down.in_features) == (6, 6)
    torch.testing.assert_close(net(x), before)


def test_a_model_changed_after_tracing_is_refused():
    net = SmallNet()
    surgeon = Surgeon(ChannelGraph(net, torch.randn(2, 3, 8, 8)))
    net.mid = nn.Conv2d(8, 12, 1)
    with pytest.raises(GraphError, match="Module 'mid' .* changed after tracing"):
        surgeon.find()


# ---- function preservation on a zoo ------------------------------------------------------------------------------

RESIDUAL = {"resnet18", "resnet50", "resnext50_32x4d", "mobilenet_v2", "resnet9", "vit", "maxvit"}


def assert_same_outputs(net: nn.Module, x: torch.Tensor, before: dict[bool, torch.Tensor]) -> None:
    for mode in (True, False):
        after = net.train(mode)(x).detach()
        torch.testing.assert_close(after, before[mode], rtol=1e-5, atol=1e-5 * before[mode].abs().max().item())


@pytest.mark.parametrize("name", [n for n in ZOO if n not in LARGE])  # the large ones: tests/test_zoo.py
def test_surgery_preserves_the_function_in_train_and_eval_mode(name):
    """Cut 30% of the groups and 30% of what is left of each residual branch from that branch alone, then more groups,
    some of them already gone from a branch; replay the history on a fresh copy. Outputs stay the uncut ones."""
    net, x = zoo_model(name)
    attach_quantizers(net)
    fresh = copy.deepcopy(net)
    graph = ChannelGraph(net, x[:2])
    surgeon = Surgeon(graph)
    killed = choose_groups(graph, 0.3)
    cuts = choose_branch_channels(graph, 0.3, spare=killed)
    assert bool(cuts) == (name in RESIDUAL)
    kill_groups(graph, killed)
    kill_branch_channels(graph, cuts)
    before = {mode: net.train(mode)(x).detach() for mode in (True, False)}

    alive = torch.zeros(graph.num_groups, dtype=torch.bool)  # a group goes whole once all its producers are dead
    for producer, groups in graph.outputs.items():
        alive[groups[~(killed[groups] | cuts.get(producer, torch.zeros(len(groups), dtype=torch.bool)))]] = True
    expected = removable_groups(graph) & ~alive
    assert (expected & killed).equal(killed)
    removal = surgeon.find()
    assert torch.equal(removal.groups, expected), "exactly the dead groups are found removable"
    assert {p: c.nonzero().flatten().tolist() for p, c in removal.cuts.items()} == {
        p: (c & ~expected[graph.outputs[p]]).nonzero().flatten().tolist() for p, c in cuts.items()
    }, "and the other killed branch channels are cut from their branches"
    assert surgeon.remove(removal).weights_removed > 0
    assert_same_outputs(net, x, before)
    kill_groups(surgeon.cuts, choose_groups(surgeon.cuts, 0.3, seed=1))
    before = {mode: net.train(mode)(x).detach() for mode in (True, False)}
    surgeon.remove(surgeon.find())
    assert_same_outputs(net, x, before)
    surgeon.cuts.check_unchanged()
    Surgeon(ChannelGraph(fresh, x[:2])).replay(surgeon.history)
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh.eval()(x), net.eval()(x), rtol=0, atol=0)


def test_a_dead_constant_is_folded_into_the_next_bias_exactly():
    """BaselineCNN: conv -> ReLU -> BN -> max-pool -> reshape -> 1x1 conv classifier. A dead channel of the last
    feature conv emits BN's shift in train mode and, with settled statistics, in eval mode too: it folds into the
    classifier's bias."""
    net = BaselineCNN(1, 10, width=4).double()
    attach_quantizers(net)
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    graph = ChannelGraph(net, x[:2])
    surgeon = Surgeon(graph)
    last, bn = net.features[8], net.features[10]
    with torch.no_grad():
        last.weight_quantizer.bits[[1, 5]] = 0.0
        last.bias[[1, 5]] = 0.3  # after ReLU 0.3, which eval mode normalises with running statistics (0, 1)
        bn.bias.copy_(torch.linspace(-0.5, 0.5, 8, dtype=torch.float64))
    freeze_statistics(net)
    assert not surgeon.find().count, "train (shift) and eval (running statistics) constants differ: not yet"
    assert surgeon.settle_statistics() == 2
    before = {mode: net.train(mode)(x).detach() for mode in (True, False)}
    removal = surgeon.find()
    assert removal.count == 2 and set(removal.folds) == {"classifier"}
    surgeon.remove(removal)
    assert last.out_channels == 6 and bn.num_features == 6 and net.classifier.in_channels == 6 * 9
    for mode in (True, False):
        torch.testing.assert_close(net.train(mode)(x).detach(), before[mode], rtol=1e-10, atol=1e-10)


def test_a_constant_that_relu_zeroes_is_removed_and_a_positive_one_waits_for_the_pull():
    net = ResNet9(3, 10, width=8)
    attach_quantizers(net)
    x = torch.randn(4, 3, 32, 32)
    surgeon = Surgeon(ChannelGraph(net, x[:2]))
    conv, bn = net.layer2[0][0], net.layer2[0][1]  # conv (padding 1, no bias) -> BN -> ReLU
    with torch.no_grad():
        conv.weight_quantizer.bits[[0, 1]] = 0.0
        bn.bias[0], bn.bias[1] = -0.2, 0.003
    surgeon.settle_statistics()
    removal = surgeon.find()
    assert removal.count == 1 and not removal.folds, "beta <= 0: ReLU maps the constant to 0"
    surgeon.remove(removal)
    assert conv.out_channels == 31
    assert surgeon.pull_constants(0.002) == 1 and bn.bias[0].item() == pytest.approx(0.001)
    assert not surgeon.find().count
    surgeon.pull_constants(0.002)
    assert bn.bias[0].item() == 0.0, "the proximal pull stops at exactly zero"
    assert surgeon.find().count == 1


@pytest.mark.parametrize(("dead", "removed"), [(5, 0), (9, 8), (16, 8)])
def test_round_to_keeps_widths_a_multiple_and_never_zero(dead, removed):
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    attach_quantizers(net)
    with torch.no_grad():
        net[0].weight_quantizer.bits[:dead] = 0.0
        net[0].bias[:dead] = -1.0  # ReLU maps the constant to 0
    surgeon = Surgeon(ChannelGraph(net, torch.randn(1, 3, 4, 4)), round_to=8)
    surgeon.remove(surgeon.find())
    assert net[0].out_channels == 16 - removed
