"""Channel permutation for 2:4 sparsity: the function stays the same, the kept magnitude grows, state follows."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_selfcompress import ChannelSurgeon, SelfCompression, Sparsity24, load_compressed
from lightning_selfcompress.core.groups import ChannelGraph
from lightning_selfcompress.core.permute import apply_permutations, channel_spaces, permute_for_24
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.sparsity import eligible_layers, is_24, mask_1d, masked_layers
from lightning_selfcompress.models import BaselineCNN, ImageClassifier, ResNet9

from conftest import trainer_kwargs
from surgery_helpers import LARGE, ZOO, SmallNet, zoo_model


def total_kept(model: nn.Module, names) -> float:
    """The weight magnitude 1-D 2:4 pruning keeps, summed over the layers (float64)."""
    total = 0.0
    for name in names:
        w = model.get_submodule(name).weight.detach().double()
        total += float((w.abs() * mask_1d(w)).sum())
    return total


def outputs(net: nn.Module, x: torch.Tensor) -> dict[bool, torch.Tensor]:
    return {mode: net.train(mode)(x).detach() for mode in (True, False)}


def assert_same(after: dict, before: dict) -> None:
    for mode in (True, False):
        torch.testing.assert_close(after[mode], before[mode], rtol=1e-5, atol=1e-5 * before[mode].abs().max().item())


def test_spaces_follow_residual_streams_and_flatten_blocks():
    net = SmallNet(width=8)
    graph = ChannelGraph(net, torch.randn(2, 3, 8, 8))
    spaces = {frozenset(key for key in s.positions): s for s in channel_spaces(graph)}
    stream = spaces[frozenset({("outputs", "stem"), ("members", "bn"), ("outputs", "branch.0"),
                               ("members", "branch.1"), ("inputs", "branch.0"), ("inputs", "mid")})]  # fmt: skip
    assert len(stream.groups) == 8, "the residual add makes stem and branch one channel space"
    flat = spaces[frozenset({("outputs", "mid"), ("inputs", "head")})]
    assert flat.positions[("inputs", "head")].shape == (16, 4), "each channel is 4 features of the head, a block"
    assert all(("outputs", "head") not in s.positions for s in spaces.values()), "the model's outputs are pinned"


# Not Swin: its first layers are the attention's, whose weights the attention function reads itself (never permuted)
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in ZOO if n != "swin"]
)
def test_permutation_preserves_the_function_and_the_greedy_keeps_more(name):
    net, x = zoo_model(name)
    attach_quantizers(net)  # b and e must follow their output channels
    before = outputs(net, x)
    layers = list(eligible_layers(net)[0])
    if name not in ("resnet9", "baseline_cnn"):  # torchvision's: a short search for the first layers (correctness,
        layers = layers[:3]  # not gain, is the point here); the random reordering below moves every space
    report = permute_for_24(net, x[:2], layers=layers, window=64, max_swaps=20)
    assert report.swaps > 0 and report.spaces > 0
    assert_same(outputs(net, x), before)
    assert sum(report.after.values()) > sum(report.before.values()), "random weights: swaps that gain exist"

    # every channel space at once, reordered at random: grouped, depthwise, concat and flatten positions follow
    graph = ChannelGraph(net, x[:2])
    spaces = channel_spaces(graph)
    generator = torch.Generator().manual_seed(0)
    apply_permutations(graph, spaces, [torch.randperm(len(s.groups), generator=generator) for s in spaces])
    assert_same(outputs(net, x), before)


def test_the_search_never_lowers_the_total_and_reports_blocks_it_cannot_follow():
    net = BaselineCNN(1, 10).double()
    layers = list(eligible_layers(net)[0])
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    before = total_kept(net, layers)
    report = permute_for_24(net, x)
    after = total_kept(net, layers)
    assert after > before
    assert any("blocks of 9 inputs" in why for why in report.unsearched.values()), report.unsearched
    again = permute_for_24(net, x)
    assert again.swaps == 0, "a second search from the optimum finds nothing to gain"
    assert total_kept(net, layers) == pytest.approx(after, rel=1e-12)


def test_a_step_after_permuting_is_the_permuted_step_adam_and_quantizers():
    torch.manual_seed(0)
    net = ResNet9(3, 10, width=8).double()
    attach_quantizers(net)
    twin = copy.deepcopy(net)
    x, y = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (8,))
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (net, twin)]

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model.train()(x), y).backward()
        optimizer.step()

    step(net, optimizers[0])
    step(twin, optimizers[1])  # Adam has moments now
    params = list(net.parameters())
    report = permute_for_24(net, x[:2], optimizers=[optimizers[0]])
    assert report.swaps > 0
    assert all(p is q for p, q in zip(params, net.parameters())), "parameters keep their identity"
    for _ in range(2):
        step(net, optimizers[0])
        step(twin, optimizers[1])
    for mode in (True, False):
        torch.testing.assert_close(net.train(mode)(x), twin.train(mode)(x), rtol=1e-9, atol=1e-10)


def module() -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    return ImageClassifier(ResNet9(in_channels=1, num_classes=10, width=8), optimizer="adam", lr=0.01)


def test_the_callback_permutes_before_pruning_and_a_checkpoint_holds_the_result(tiny_fmnist, tmp_path):
    net, sparsity = module(), Sparsity24(start_step=3, permute=True)
    trainer = pl.Trainer(callbacks=[sparsity], **trainer_kwargs(tmp_path, max_steps=6))
    trainer.fit(net, tiny_fmnist)
    report = sparsity.permutation
    assert report is not None and report.swaps > 0
    assert sum(report.after.values()) > sum(report.before.values())
    assert sparsity.sparsifier.kept_magnitude == pytest.approx(report.after), "the masks were derived after permuting"
    layers = {n: m for n, m in masked_layers(net).items() if not m.weight_mask.all()}
    assert len(layers) == 8 and all(is_24(m.weight) for m in layers.values())

    path = tmp_path / "permuted.ckpt"
    trainer.save_checkpoint(path)
    x = next(iter(tiny_fmnist.test_dataloader()))[0][:8]
    live = net.eval()(x)
    torch.testing.assert_close(load_compressed(module(), path)(x), live, rtol=0, atol=0)
    resumed_net, resumed = module(), Sparsity24(start_step=3, permute=True)
    pl.Trainer(callbacks=[resumed], **trainer_kwargs(tmp_path, max_steps=6)).fit(resumed_net, tiny_fmnist, ckpt_path=path)
    assert resumed.sparsifier.pruned and resumed.permutation.after == report.after, "no second permutation after resume"
    torch.testing.assert_close(resumed_net.eval()(x), live, rtol=0, atol=0)


def test_a_permutation_before_the_surgeons_first_cut_replays_exactly(tiny_fmnist, tmp_path):
    """Permute and prune at step 0, let self-compression kill channels and the surgeon cut them: the masked layers
    stay 2:4 and the checkpoint rebuilds (history replayed onto the permuted weights) to the live model exactly."""
    net, sparsity = module(), Sparsity24(start_step=0, permute=True)
    compression = SelfCompression(gamma=2.0, init_bits=2.0, quantizer_lr=0.3)  # channels die within a few steps
    surgeon = ChannelSurgeon(every_n_steps=8, constant_pull=0.01, round_to=4)  # widths that can stay 2:4
    trainer = pl.Trainer(callbacks=[compression, surgeon, sparsity], **trainer_kwargs(tmp_path, max_steps=32))
    trainer.fit(net, tiny_fmnist)
    assert sparsity.permutation.swaps > 0 and surgeon.history, "permuted, then cut"
    masked = {n: m for n, m in masked_layers(net).items() if not m.weight_mask.all()}
    assert masked and all(is_24(m.weight_mask) and not (m.weight * ~m.weight_mask).any() for m in masked.values())
    path = tmp_path / "permuted_cut.ckpt"
    trainer.save_checkpoint(path)
    x = next(iter(tiny_fmnist.test_dataloader()))[0][:8]
    torch.testing.assert_close(load_compressed(module(), path)(x), net.eval()(x), rtol=0, atol=0)


def test_permute_after_a_cut_or_a_non_bool_is_a_clear_error(tiny_fmnist, tmp_path):
    with pytest.raises(TypeError, match="permute=.yes. must be True or False"):
        Sparsity24(0, permute="yes")
    compression = SelfCompression(gamma=2.0, init_bits=2.0, quantizer_lr=0.3)
    callbacks = [compression, ChannelSurgeon(every_n_steps=4, constant_pull=0.01), Sparsity24(24, permute=True)]
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=30))
    with pytest.raises(RuntimeError, match="must prune before the ChannelSurgeon's first cut.*start_step=0"):
        trainer.fit(module(), tiny_fmnist)
    assert callbacks[1].history, "the surgeon had cut before step 24"
