"""Rules that users register for their own modules and functions: both tracers follow them, surgery stays exact."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from lightning_selfcompress import Rule, register_rule
from lightning_selfcompress.core.graph import input_sources
from lightning_selfcompress.core.groups import ChannelGraph, GraphError
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.rules import _RULES
from lightning_selfcompress.core.surgery import Surgeon
from lightning_selfcompress.testing import kill_groups

from surgery_helpers import freeze_statistics


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
    assert input_sources(net)["b"] == tuple(frozenset({("a", i)}) for i in range(6)), "the lenient tracer too"
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
    assert input_sources(Net(ChannelSoftmax()))["b"] is None, "the lenient tracer counts them live"
    with pytest.raises(TypeError, match="rule='apply' is not a Rule"):
        register_rule(ChannelSoftmax, "apply")
    with pytest.raises(TypeError, match="neither an nn.Module class nor a function"):
        register_rule(3, Rule.ELEMENTWISE)
