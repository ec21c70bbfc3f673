"""Surgery in place: optimizer state, gradients, frozen parameters, atomicity, history replay, load_compressed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_selfcompress.core.groups import ChannelGraph, Cuts, GraphError
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.surgery import Removal, Surgeon, load_compressed
from lightning_selfcompress.models import BaselineCNN

from lightning_selfcompress.testing import choose_branch_channels, choose_groups, kill_branch_channels, kill_groups

from surgery_helpers import SmallNet, freeze_statistics

OPTIMIZERS = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "sgd-nesterov-wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd-fused": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, fused=True)),
    "adam": (torch.optim.Adam, dict(lr=0.01)),
    "adam-amsgrad-foreach": (torch.optim.Adam, dict(lr=0.01, amsgrad=True, foreach=True)),
    "adam-fused": (torch.optim.Adam, dict(lr=0.01, fused=True)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05)),
    "adamw-fused-amsgrad": (torch.optim.AdamW, dict(lr=0.01, amsgrad=True, fused=True)),
    "nadam": (torch.optim.NAdam, dict(lr=0.01)),
    "radam": (torch.optim.RAdam, dict(lr=0.01)),
    "adamax": (torch.optim.Adamax, dict(lr=0.01)),
    "rmsprop-centered-momentum": (torch.optim.RMSprop, dict(lr=0.003, momentum=0.5, centered=True)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.05)),
    "adagrad-foreach": (torch.optim.Adagrad, dict(lr=0.05, foreach=True)),
    "adadelta": (torch.optim.Adadelta, dict(lr=0.5)),
    "asgd": (torch.optim.ASGD, dict(lr=0.01, t0=2)),
    "rprop": (torch.optim.Rprop, dict(lr=0.01)),
}


def train_steps(net, optimizer, batches, after_step=None) -> list[float]:
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        if after_step:
            after_step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_training_on_after_a_cut_equals_holding_the_channels_at_zero(name):
    """Train a few steps, cut (whole groups, and channels of the residual branch alone), train on: the losses and
    every kept weight equal a reference run in which the same channels were merely held at zero throughout. Proves
    that optimizer state was sliced right, not just to shape."""
    cls, kwargs = OPTIMIZERS[name]
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 8, 8, generator=generator, dtype=torch.float64),
                torch.randint(0, 5, (8,), generator=generator)) for _ in range(8)]  # fmt: skip
    cut = SmallNet().double()
    graph = ChannelGraph(cut, batches[0][0][:2])
    killed = choose_groups(graph, 0.4, seed=3)
    branch_cuts = choose_branch_channels(graph, 0.5, seed=3, spare=killed)
    assert set(branch_cuts) == {"branch.0"}

    def hold(g: ChannelGraph) -> None:
        kill_groups(g, killed, bits=False)
        kill_branch_channels(g, branch_cuts, bits=False)

    hold(graph)
    reference = copy.deepcopy(cut)
    reference_graph = ChannelGraph(reference, batches[0][0][:2])
    opt_cut, opt_ref = cls(cut.parameters(), **kwargs), cls(reference.parameters(), **kwargs)

    losses_ref = train_steps(reference, opt_ref, batches, lambda: hold(reference_graph))
    losses_cut = train_steps(cut, opt_cut, batches[:4], lambda: hold(graph))
    names = {p: n for n, p in cut.named_parameters()}
    state_before = {names[p]: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt_cut.state.items()}

    Surgeon(graph).remove(Removal(killed, cuts=branch_cuts), [opt_cut])
    assert cut.branch[0].out_channels < cut.stem.out_channels, "the branch is narrower than the stream it joins"
    assert {k: int(v["step"]) for k, v in state_before.items() if "step" in v} == {
        names[p]: int(s["step"]) for p, s in opt_cut.state.items() if "step" in s
    }, "scalar state is kept"
    losses_cut += train_steps(cut, opt_cut, batches[4:])

    torch.testing.assert_close(torch.tensor(losses_cut), torch.tensor(losses_ref), rtol=1e-10, atol=1e-12)
    ref_params = dict(reference.named_parameters())
    for pname, p in cut.named_parameters():
        expected = ref_params[pname].detach()
        module = pname.rsplit(".", 1)[0]
        for role, dim in (("outputs", 0), ("inputs", 1), ("members", 0)):
            if module in getattr(reference_graph, role) and expected.dim() > dim and (role != "inputs" or p.dim() > 1):
                keep = Cuts(reference_graph).kept(module, role, killed, branch_cuts)
                expected = expected if keep is None else expected.index_select(dim, keep)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12, msg=f"{pname} after the cut")


def test_parameters_keep_identity_gradients_are_sliced_and_frozen_stay_frozen():
    net = SmallNet()
    x = torch.randn(4, 3, 8, 8)
    graph = ChannelGraph(net, x[:2])
    net.bn.weight.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    net(x).sum().backward()
    optimizer.step()
    ids = {n: id(p) for n, p in net.named_parameters()}
    killed = choose_groups(graph, 0.5)
    record = Surgeon(graph).remove(Removal(killed), [optimizer])

    assert {n: id(p) for n, p in net.named_parameters()} == ids
    assert not net.bn.weight.requires_grad and net.bn.weight.grad is None
    for p in net.parameters():
        if p.grad is not None:
            assert p.grad.shape == p.shape
        if p in optimizer.state:
            assert optimizer.state[p]["momentum_buffer"].shape == p.shape
    removed = sum(record.channels.values())
    assert removed == int(killed.sum()) * 2 - int(killed[graph.outputs["mid"]].sum()), "stem+branch are coupled"
    assert net.stem.out_channels == net.bn.num_features == net.branch[0].in_channels == net.mid.in_channels
    assert net.head.in_features == net.mid.out_channels * 4
    net(x).sum().backward()  # and the network still trains
    optimizer.step()


def test_factored_state_is_sliced_along_the_dimensions_it_keeps():
    """Adafactor keeps, per matrix, a variance per row and per column (per conv kernel: its last two dims)."""
    net = SmallNet()
    x = torch.randn(4, 3, 8, 8)
    graph = ChannelGraph(net, x[:2])
    optimizer = torch.optim.Adafactor(net.parameters(), lr=0.01)
    net(x).sum().backward()
    optimizer.step()
    factored = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in (net.head.weight, net.mid.weight)}
    killed = choose_groups(graph, 0.5)
    keep = Cuts(graph).kept("head", "inputs", killed)
    Surgeon(graph).remove(Removal(killed), [optimizer])
    state = optimizer.state[net.head.weight]
    assert state["row_var"].shape == (5, 1) and torch.equal(state["row_var"], factored[net.head.weight]["row_var"])
    assert torch.equal(state["col_var"], factored[net.head.weight]["col_var"][:, keep])
    assert optimizer.state[net.mid.weight]["row_var"].shape[:2] == net.mid.weight.shape[:2]
    net(x).sum().backward()  # and it trains on
    optimizer.step()


def test_lbfgs_and_state_that_is_not_per_parameter_are_refused_before_anything_changes():
    net = SmallNet()
    x = torch.randn(4, 3, 8, 8)
    graph = ChannelGraph(net, x[:2])
    killed = choose_groups(graph, 0.5)
    lbfgs = torch.optim.LBFGS(net.parameters(), lr=0.1, max_iter=2)
    lbfgs.step(lambda: net(x).sum().backward() or net(x).sum())
    shapes = [p.shape for p in net.parameters()]
    with pytest.raises(ValueError, match="LBFGS: its history .* one flat vector over all parameters"):
        Surgeon(graph).remove(Removal(killed), [lbfgs])
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    sgd.state[net.mid.weight]["flat"] = torch.zeros(7)  # an optimizer of one's own with state of another shape
    with pytest.raises(ValueError, match=r"SGD keeps state 'flat' of shape \(7,\) for a parameter of shape"):
        Surgeon(graph).remove(Removal(killed), [sgd])
    assert [p.shape for p in net.parameters()] == shapes, "nothing was cut"


def test_a_failing_surgery_leaves_model_and_optimizer_untouched():
    net = SmallNet()
    x = torch.randn(4, 3, 8, 8)
    graph = ChannelGraph(net, x[:2])
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    net(x).sum().backward()
    optimizer.step()
    net.bn.register_buffer("odd", torch.zeros(3))  # a buffer the surgeon cannot slice, met late in the plan
    snapshot = copy.deepcopy((net.state_dict(), optimizer.state_dict()))
    surgeon = Surgeon(graph)
    with pytest.raises(GraphError, match="Cannot tell how to slice buffer 'odd'"):
        surgeon.remove(Removal(choose_groups(graph, 0.5)), [optimizer])
    after = net.state_dict(), optimizer.state_dict()
    torch.testing.assert_close(after, snapshot)
    assert not surgeon.cuts.removed.any()


def test_history_replays_on_a_fresh_model_and_a_mismatched_history_is_refused():
    net = SmallNet()
    attach_quantizers(net)
    x = torch.randn(4, 3, 8, 8)
    surgeon = Surgeon(ChannelGraph(net, x[:2]))
    first, second = choose_groups(surgeon.graph, 0.3, seed=1), None
    surgeon.remove(Removal(first), step=10)
    second = choose_groups(surgeon.cuts, 0.3, seed=2)
    surgeon.remove(Removal(second), step=20)

    fresh = SmallNet()
    attach_quantizers(fresh)
    replayed = Surgeon(ChannelGraph(fresh, x[:2]))
    replayed.replay([r.to_dict() for r in surgeon.history])
    assert {n: p.shape for n, p in fresh.named_parameters()} == {n: p.shape for n, p in net.named_parameters()}
    assert [r.step for r in replayed.history] == [10, 20]

    other = SmallNet(width=6)
    with pytest.raises(GraphError, match="history does not fit this model"):
        Surgeon(ChannelGraph(other, x[:2])).replay([r.to_dict() for r in surgeon.history])
    with pytest.raises(GraphError, match="history does not fit this model: .*removed before"):
        replayed.replay([surgeon.history[0].to_dict()])
    not_a_branch = dict(surgeon.history[0].to_dict(), groups=[], branches={"mid": [0]})
    with pytest.raises(GraphError, match="history does not fit this model: 'mid' is not the producer of a residual"):
        replayed.replay([not_a_branch])


def test_a_branch_cut_replays_and_a_channel_cut_twice_is_refused():
    net = SmallNet()
    attach_quantizers(net)
    x = torch.randn(4, 3, 8, 8)
    surgeon = Surgeon(ChannelGraph(net, x[:2]))
    cuts = {"branch.0": torch.zeros(8, dtype=torch.bool)}
    cuts["branch.0"][[1, 4]] = True
    record = surgeon.remove(Removal(torch.zeros(surgeon.graph.num_groups, dtype=torch.bool), cuts=cuts), step=5)
    assert record.branches == {"branch.0": [1, 4]} and record.channels == {"branch.0": 2}
    assert net.branch[0].out_channels == 6 and net.branch[1].num_features == 6 and net.stem.out_channels == 8
    assert net(x).shape == (4, 5)
    with pytest.raises(GraphError, match="Cannot cut channel 1 from the branch of 'branch.0': it is gone already"):
        surgeon.remove(Removal(torch.zeros(surgeon.graph.num_groups, dtype=torch.bool), cuts=cuts))

    fresh = SmallNet()
    attach_quantizers(fresh)
    Surgeon(ChannelGraph(fresh, x[:2])).replay([record.to_dict()])
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
    with pytest.raises(GraphError, match="were cut from a residual branch already; trace the model before surgery"):
        ChannelGraph(fresh, x[:2])


def test_load_compressed_rebuilds_the_model_from_a_checkpoint(tmp_path):
    net = SmallNet()
    attach_quantizers(net)
    x = torch.randn(4, 3, 8, 8)
    surgeon = Surgeon(ChannelGraph(net, x[:2]))
    surgeon.remove(Removal(choose_groups(surgeon.graph, 0.4)))
    checkpoint = {"state_dict": net.state_dict(), "surgery": surgeon.state_dict(), "callbacks": {}}
    torch.save(checkpoint, tmp_path / "run.ckpt")  # the layout save_compressed and ChannelSurgeon's checkpoints share
    loaded = load_compressed(SmallNet(), tmp_path / "run.ckpt")
    torch.testing.assert_close(loaded(x), net.eval()(x), rtol=0, atol=0)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_compressed(SmallNet(), tmp_path / "missing.ckpt")
    with pytest.raises(RuntimeError, match="does not fit SmallNet"):
        load_compressed(SmallNet(), {"state_dict": net.state_dict()})


def test_a_dead_branch_channel_waits_for_the_pull_and_then_leaves_its_branch_alone():
    net = SmallNet()
    attach_quantizers(net)
    x = torch.randn(4, 3, 8, 8)
    surgeon = Surgeon(ChannelGraph(net, x[:2]))
    with torch.no_grad():
        net.branch[0].weight_quantizer.bits[2] = 0.0  # the stem still feeds stream channel 2: its group is alive
        net.branch[1].bias[2] = 0.003  # the branch adds relu(0.003) for it
    assert surgeon.settle_statistics() == 1, "the dead branch channel's running statistics settle"
    assert not surgeon.find().count
    surgeon.pull_constants(0.002)
    assert net.branch[1].bias[2].item() == pytest.approx(0.001) and not surgeon.find().count
    surgeon.pull_constants(0.002)
    freeze_statistics(net)
    before = {mode: net.train(mode)(x).detach() for mode in (True, False)}
    removal = surgeon.find()
    assert not removal.groups.any() and removal.cuts["branch.0"].nonzero().flatten().tolist() == [2]
    surgeon.remove(removal)
    assert (net.branch[0].out_channels, net.stem.out_channels) == (7, 8)
    for mode in (True, False):
        torch.testing.assert_close(net.train(mode)(x).detach(), before[mode])


def test_a_channels_last_model_stays_channels_last_through_a_surgery():
    net = SmallNet().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8).to(memory_format=torch.channels_last)
    graph = ChannelGraph(net, x[:2])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(x).sum().backward()
    optimizer.step()
    Surgeon(graph).remove(Removal(choose_groups(graph, 0.5)), [optimizer])
    for tensor in (net.stem.weight, net.stem.weight.grad, optimizer.state[net.stem.weight]["momentum_buffer"]):
        assert tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


@pytest.mark.parametrize(("include", "exclude", "cut"), [
    (("*",), (), {"features.0": 3, "features.2": 2}),
    (("*",), ("features.0",), {"features.2": 2}),
    (("features.0",), (), {"features.0": 3}),
])  # fmt: skip
def test_include_and_exclude_choose_the_layers_whose_dead_channels_are_cut(include, exclude, cut):
    net = BaselineCNN(width=8)
    attach_quantizers(net)
    with torch.no_grad():
        for layer, dead in ((net.features[0], 3), (net.features[2], 2)):
            layer.weight_quantizer.bits[:dead] = -1.0
            layer.bias[:dead] = -1.0  # the ReLU after it: they output exact zeros
    x = torch.randn(4, 1, 28, 28)
    before = net.eval()(x)
    surgeon = Surgeon(ChannelGraph(net, x[:2]), include=include, exclude=exclude)
    record = surgeon.remove(surgeon.find())
    assert record.channels == cut
    torch.testing.assert_close(net(x), before)
    with pytest.raises(TypeError, match="exclude='features.0' must be a list of glob patterns"):
        Surgeon(ChannelGraph(net, x[:2]), exclude="features.0")
    with pytest.raises(ValueError, match="exclude pattern 'net.features.0' matches no module of BaselineCNN"):
        Surgeon(ChannelGraph(net, x[:2]), exclude=["net.features.0"])  # a typo would leave the layer cut
