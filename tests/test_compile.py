"""torch.compile across a surgery: one recompilation after the cut, none later, and the same outputs as eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.surgery import Surgeon
from lightning_selfcompress.models import ResNet9
from lightning_selfcompress.testing import choose_branch_channels, choose_groups, kill_branch_channels, kill_groups


@pytest.mark.slow
def test_a_compiled_model_recompiles_once_after_a_surgery_and_agrees_with_eager():
    """CPU, the aot_eager backend (Dynamo's graph capture and guards, AOT autograd; no C++ code generation). The
    cut removes whole groups and channels of ResNet-9's residual branches alone, whose re-embedding hooks are new."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    net = ResNet9(1, 10, width=4)
    attach_quantizers(net)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    graph = ChannelGraph(net, x[:2])
    surgeon = Surgeon(graph)
    compiled = torch.compile(net, backend="aot_eager")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def steps(n: int) -> int:
        for _ in range(n):
            optimizer.zero_grad()
            F.cross_entropy(compiled(x), y).backward()
            optimizer.step()
        return counters["stats"]["unique_graphs"]

    before = steps(2)
    killed = choose_groups(graph, 0.3)
    kill_groups(graph, killed)
    kill_branch_channels(graph, choose_branch_channels(graph, 0.3, spare=killed))
    record = surgeon.remove(surgeon.find(), [optimizer])
    assert record.groups and record.branches
    after = steps(2)
    later = steps(2)
    assert (before, after - before, later - after) == (1, 1, 0)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), net.eval()(x))
