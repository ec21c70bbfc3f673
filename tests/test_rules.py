"""Rules that users register for their own modules and functions: both tracers follow them, surgery stays exact."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from lightning_selfcompress import Rule, register_rule
from lightning_selfcompress.core.groups import ChannelGraph, GraphError
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.rules import _RULES
from lightning_selfcompress.core.size import input_sources
from lightning_selfcompress.core.surgery import Surgeon
from lightning_selfcompress.testing import kill_groups

from surgery_helpers import LARGE, ZOO, freeze_statistics, zoo_model


def erf_activation(x):
    return torch.erf(x) * 1.5


torch.fx.wrap("erf_activation")  # one call in the trace, as a user would wrap a function of their own


class ErfActivation(nn.Module):
    def forward(self, x):
        return torch.erf(x) * 1.5 + torch.special.expit(x).mul(0)  # ops the tracers do not know


class ChannelSoftmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=1)


class Net(nn.Module):
    def __init__(self, act: nn.Module | None) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 2, 1)
        self.bn = nn.BatchNorm2d(6)
        self.act = act

    def forward(self, x):
        x = self.bn(self.a(x))
        x = self.act(x) if self.act is not None else erf_activation(x)
        return self.c(self.b(x))


@pytest.fixture(autouse=True)
def no_rules_left_behind():
    yield
    _RULES.clear()


@pytest.mark.parametrize("act", [ErfActivation(), None], ids=["module", "function"])
def test_a_registered_elementwise_block_is_followed_and_cut_exactly(act):
    net, x = Net(act).double(), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    attach_quantizers(net)
    freeze_statistics(net)
    with pytest.raises(GraphError, match=r"is not an op it knows.* register_rule\(<its module class or function>"):
        ChannelGraph(net, x[:2])
    register_rule(ErfActivation if act is not None else erf_activation, Rule.ELEMENTWISE)
    graph = ChannelGraph(net, x[:2])
    assert torch.equal(graph.inputs["b"], graph.outputs["a"])
    assert input_sources(net, x)["b"] == [frozenset({("a", i)}) for i in range(6)], "size accounting too"
    killed = torch.zeros(graph.num_groups, dtype=torch.bool)
    killed[graph.outputs["a"][[1, 4]]] = True
    kill_groups(graph, killed)  # 0 bits, no bias, no BatchNorm shift: zeros that erf keeps at zero
    before = {mode: net.train(mode)(x).detach() for mode in (True, False)}
    surgeon = Surgeon(graph)
    surgeon.remove(surgeon.find())
    assert net.a.out_channels == net.bn.num_features == net.b.in_channels == 4
    for mode in (True, False):
        torch.testing.assert_close(net.train(mode)(x), before[mode])


def test_a_block_that_mixes_channels_pins_them_and_bad_registrations_are_named():
    register_rule(ChannelSoftmax, Rule.MIXES_CHANNELS)
    graph = ChannelGraph(Net(ChannelSoftmax()), torch.randn(2, 3, 4, 4))
    assert {graph.pinned[int(g)] for g in graph.outputs["a"]} == {"read across channels by 'act' (its registered rule)"}
    assert input_sources(Net(ChannelSoftmax()), torch.randn(2, 3, 4, 4))["b"] == [None] * 6, "size: counted live"
    with pytest.raises(TypeError, match="rule='apply' is not a Rule"):
        register_rule(ChannelSoftmax, "apply")
    with pytest.raises(TypeError, match="neither an nn.Module class nor a function"):
        register_rule(3, Rule.ELEMENTWISE)


class Attention(nn.Module):
    """Self-attention over the positions of a channels-last sequence: reads every channel, returns (output, weights)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return self.proj(weights @ v), weights


class Block(nn.Module):
    """A transformer block: x + attention(x), then x + MLP(x), its hidden units on the last dim."""

    def __init__(self, attention: nn.Module, dim: int = 8) -> None:
        super().__init__()
        self.embed, self.attention, self.head = nn.Conv1d(3, dim, 1), attention, nn.Linear(dim, 2)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))

    def forward(self, x):
        x = self.embed(x).transpose(1, 2)
        attended = self.attention(x, x, x, need_weights=False) if isinstance(self.attention, nn.MultiheadAttention) \
            else self.attention(x)
        x = x + attended[0]
        return self.head(x + self.mlp(x)).mean(1)


@pytest.mark.parametrize("attention", [Attention(8), nn.MultiheadAttention(8, 2, batch_first=True)],
                         ids=["own", "torch"])  # fmt: skip
def test_an_opaque_block_keeps_what_it_reads_and_writes_and_the_mlp_around_it_is_cut(attention):
    net, x = Block(attention).double(), torch.randn(4, 3, 5, dtype=torch.float64)
    attach_quantizers(net)
    if isinstance(attention, Attention):
        with pytest.raises(GraphError, match=r"node 'matmul'.*inside module 'attention'.*OPAQUE for a block such as attention"):
            ChannelGraph(net, x[:2])
        register_rule(Attention, Rule.OPAQUE)
    graph = ChannelGraph(net, x[:2])
    assert graph.pinned_mask[graph.outputs["embed"]].all(), "what attention reads stays"
    assert not graph.pinned_mask[graph.outputs["mlp.0"]].any(), "the MLP's hidden units can go"
    killed = torch.zeros(graph.num_groups, dtype=torch.bool)
    killed[graph.outputs["mlp.0"][[0, 5, 9]]] = True
    kill_groups(graph, killed)
    before = {mode: net.train(mode)(x).detach() for mode in (True, False)}
    surgeon = Surgeon(graph)
    surgeon.remove(surgeon.find())
    assert net.mlp[0].out_features == net.mlp[2].in_features == 13
    for mode in (True, False):
        torch.testing.assert_close(net.train(mode)(x), before[mode])


class DropPath(nn.Module):
    """timm's idiom: whole samples dropped in training (scaled by 1/(1-p) otherwise), the identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], *[1] * (x.dim() - 1), dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


def test_a_block_registered_as_the_identity_in_eval_mode_is_cut_exactly_in_both_modes():
    net, x = Net(DropPath(0.5)).double(), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    attach_quantizers(net)
    freeze_statistics(net)
    register_rule(DropPath, Rule.EVAL_IDENTITY)
    graph = ChannelGraph(net.train(), x[:2])
    assert [s.kind for s in graph.steps if s.node == "act"] == ["dropout"], "kept whole and followed by its rule"
    assert input_sources(net, x)["b"] == [frozenset({("a", i)}) for i in range(6)], "size accounting too"
    killed = torch.zeros(graph.num_groups, dtype=torch.bool)
    killed[graph.outputs["a"][[0, 3]]] = True
    kill_groups(graph, killed)  # zeros: dropped or scaled, still zeros

    def outputs() -> dict[bool, torch.Tensor]:
        torch.manual_seed(0)  # the same samples dropped before and after the cut
        return {mode: net.train(mode)(x).detach() for mode in (True, False)}

    before = outputs()
    surgeon = Surgeon(graph)
    surgeon.remove(surgeon.find())
    assert net.a.out_channels == net.b.in_channels == 4
    for mode, after in outputs().items():
        torch.testing.assert_close(after, before[mode])


@pytest.mark.parametrize("name", [n for n in ZOO if n not in LARGE])  # every family but the large ResNets/VGG
def test_the_lenient_walker_of_size_accounting_agrees_with_the_strict_one_of_surgery(name):
    """One walker, two modes: wherever the strict one traces, the lenient one finds the same producers at every
    input position of every layer."""
    net, x = zoo_model(name, batch=2)
    strict = ChannelGraph(net, x).input_producers()
    assert ChannelGraph(net, x, strict=False).input_producers() == strict
    assert sum(p is not None for positions in strict.values() for p in positions) > 0


def test_a_layer_behind_an_unknown_op_that_returns_a_tuple_is_still_recorded_and_followed():
    class Sorted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 1), nn.Conv2d(5, 2, 1)

        def forward(self, x):
            return self.c(self.b(torch.sort(self.a(x), dim=1)[0]))

    sources = input_sources(Sorted(), torch.randn(2, 3, 4, 4))
    assert sources["b"] == [None] * 4, "it reads the unknown op's values"
    assert sources["c"] == [frozenset({("b", i)}) for i in range(5)], "b's own channels are followed"


def test_the_lenient_walker_counts_live_only_what_reads_an_op_it_does_not_know():
    """Surgery refuses the unknown op; size accounting follows every layer but the one that reads it."""
    net, x = Net(ChannelSoftmax()), torch.randn(2, 3, 4, 4)
    with pytest.raises(GraphError, match="node 'softmax'"):
        ChannelGraph(net, x)
    sources = input_sources(net, x)
    assert sources["b"] == [None] * 6, "it reads the unknown op: every input live"
    assert sources["c"] == [frozenset({("b", i)}) for i in range(6)], "the layer after it is followed again"
