"""2:4 masks along TensorRT's axis: the 1-D and 2-D calculators, the checker, eligibility."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import nn

from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers
from lightning_selfcompress.core.sparsity import (
    Sparsifier24, as_rows, from_rows, ineligible_reason, is_24, kept_magnitude, mask_1d, mask_2d,
)  # fmt: skip
from lightning_selfcompress.models import ResNet9

SHAPES = [(8, 16), (8, 12, 3, 3), (4, 8, 1, 1), (12, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_rows_hold_the_input_channels_of_each_output_and_kernel_position(shape):
    weight = torch.randn(shape)
    matrix = as_rows(weight)
    assert matrix.shape[1] == shape[1]
    assert torch.equal(from_rows(matrix, weight.shape), weight)
    if len(shape) == 4:  # row (r, s, k) holds weight[k, :, r, s]
        k, r, s = shape[0] - 1, shape[2] - 1, shape[3] - 1
        row = (r * shape[3] + s) * shape[0] + k
        assert torch.equal(matrix[row], weight[k, :, r, s])


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_1d_keeps_the_two_largest_of_every_group_of_four_input_channels(shape):
    weight = torch.randn(shape)
    mask = mask_1d(weight)
    assert mask.shape == weight.shape and mask.dtype == torch.bool
    assert is_24(weight * mask)
    groups, kept = as_rows(weight).abs().reshape(-1, 4), as_rows(mask).reshape(-1, 4)
    assert (kept.sum(1) == 2).all()
    assert torch.equal(groups[kept].reshape(-1, 2).min(1).values >= groups[~kept].reshape(-1, 2).max(1).values,
                       torch.ones(len(groups), dtype=torch.bool))  # fmt: skip


def test_there_are_90_patterns_with_two_per_row_and_column():
    from lightning_selfcompress.core.sparsity import _PATTERNS_2D

    assert _PATTERNS_2D.shape == (90, 16)
    blocks = _PATTERNS_2D.reshape(90, 4, 4)
    assert (blocks.sum(1) == 2).all() and (blocks.sum(2) == 2).all()
    assert len({tuple(p.tolist()) for p in _PATTERNS_2D}) == 90


@pytest.mark.parametrize("shape", [(8, 16), (8, 12, 3, 3), (4, 4, 2, 2)])
def test_mask_2d_is_two_four_both_ways_and_the_best_such_pattern_per_block(shape):
    weight = torch.randn(shape)
    mask = mask_2d(weight)
    assert is_24(weight * mask)
    matrix, keep = as_rows(weight).abs(), as_rows(mask)
    rows, cols = matrix.shape
    assert ((keep.reshape(rows // 4, 4, cols) != 0).sum(1) == 2).all(), "the transposed weight is 2:4 too"
    legal = [p for p in itertools.product((0, 1), repeat=16)
             if all(sum(p[4 * i: 4 * i + 4]) == 2 for i in range(4)) and all(sum(p[j::4]) == 2 for j in range(4))]  # fmt: skip
    block = matrix[:4, :4]
    best = max(sum(v * b for v, b in zip(block.flatten().tolist(), p)) for p in legal)
    assert (block * keep[:4, :4]).sum().item() == pytest.approx(best, rel=1e-6)
    assert kept_magnitude(weight, mask) <= kept_magnitude(weight, mask_1d(weight)) + 1e-6, "1-D is optimal per group"


def test_the_checker_sees_three_non_zeros_in_a_group():
    weight = torch.zeros(2, 8)
    weight[0, :2] = 1.0
    assert is_24(weight)
    weight[0, 2] = 1.0
    assert not is_24(weight)
    assert not is_24(torch.zeros(2, 6)), "6 input channels cannot be grouped by 4"


def test_weights_that_cannot_hold_the_pattern_are_a_clear_error():
    with pytest.raises(ValueError, match=r"\(8, 6, 3, 3\) has 6 input channels, not a multiple of 4"):
        mask_1d(torch.randn(8, 6, 3, 3))
    with pytest.raises(ValueError, match="6 output channels, not a multiple of 4: .* use mask_1d"):
        mask_2d(torch.randn(6, 8))


def midrise(layer: nn.Module) -> nn.Module:
    attach_quantizers(layer, QuantizationConfig(grid="midrise"))
    return layer


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (nn.Conv2d(3, 16, 3), "only 3 input channels|not a multiple of 4"),
        (nn.Conv2d(16, 16, 3, groups=16), "grouped convolution \\(groups=16\\)"),
        (nn.Linear(10, 4), "10 input channels, not a multiple of 4"),
        (nn.Conv2d(4, 8, 1), "only 4 input channels"),
        (nn.BatchNorm2d(8), "neither a convolution nor a Linear"),
        (nn.ConvTranspose2d(8, 8, 3), "transposed convolution: its weight is \\[in, out, ...\\]"),
        (midrise(nn.Conv2d(16, 16, 3)), "mid-rise grid has no zero level"),
    ],
)
def test_ineligible_layers_say_why(module, reason):
    assert ineligible_reason(module) is not None
    assert re.search(reason, ineligible_reason(module))


def test_eligible_layers_have_no_reason():
    assert ineligible_reason(nn.Conv2d(16, 32, 3)) is None and ineligible_reason(nn.Linear(64, 10)) is None


# ---- enforcement ------------------------------------------------------------------------------------------------

def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("optimizer", "kwargs"),
    [
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
        (torch.optim.Adam, dict(lr=0.01)),
        (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    ],
    ids=["sgd-momentum", "adam", "adamw"],
)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_pruned_weights_stay_exactly_zero_through_training(optimizer, kwargs, bf16):
    from lightning_selfcompress.core.sparsity import MaskEnforcer, attach_masks

    net = small_net()
    opt = optimizer(net.parameters(), **kwargs)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(3):  # dense training first: the optimizer has state everywhere, as in ASP's one-shot prune
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    masked, skipped = attach_masks(net)
    assert set(masked) == {"2", "7"} and "3 input channels" in skipped["0"]
    enforcer = MaskEnforcer(opt, masked)
    for step in range(6):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x), y) / 2
        loss.backward()
        if step % 2:  # gradient accumulation over two micro-batches
            opt.step()
            opt.zero_grad()
    for module in masked.values():
        assert is_24(module.weight), "2:4 holds after training"
        assert (module.weight[~module.weight_mask] == 0).all()
        for value in opt.state[module.weight].values():
            if value.shape == module.weight.shape:
                assert (value[~module.weight_mask] == 0).all(), "no optimizer state where a weight is pruned"
    enforcer.remove()


def test_masks_are_buffers_in_the_state_dict_and_a_stale_mask_is_refused():
    from lightning_selfcompress.core.sparsity import apply_masks, attach_masks

    net = small_net()
    masked, _ = attach_masks(net, "2d")
    assert "2.weight_mask" in net.state_dict() and "7.weight_mask" not in net.state_dict()  # 10 outputs: no 4x4
    fresh = small_net()
    fresh[2].register_buffer("weight_mask", torch.ones_like(fresh[2].weight, dtype=torch.bool))
    fresh.load_state_dict(net.state_dict(), strict=False)
    assert torch.equal(fresh[2].weight_mask, net[2].weight_mask)
    net[2].weight_mask = net[2].weight_mask[:, :8]
    with pytest.raises(ValueError, match="no longer fits the weight"):
        apply_masks(masked)


def test_a_model_with_no_eligible_layer_names_every_layer_and_why():
    from lightning_selfcompress.core.sparsity import attach_masks

    with pytest.raises(ValueError, match="No layer of Sequential can hold a 2:4 pattern: 0: .*3 input channels"):
        attach_masks(nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)))


def test_recompute_puts_the_dropped_weights_back_at_their_stowed_values_and_lets_magnitude_choose_again():
    from lightning_selfcompress.core.sparsity import recompute_mask, stow_dropped

    layer = nn.Linear(8, 1, bias=False)
    layer.register_buffer("weight_mask", torch.ones_like(layer.weight, dtype=torch.bool))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, -1.0, 0.125, -0.5, 0.375, 0.25]]))
    assert recompute_mask(layer).tolist() == [[0.0, 0.0, 2.0, -1.0, 0.125, 0.0, 0.0, 0.25]], "what it dropped"
    assert layer.weight.tolist() == [[4.0, 3.0, 0.0, 0.0, 0.0, -0.5, 0.375, 0.0]]
    with torch.no_grad():  # training shrinks a kept weight below a dropped one's value
        layer.weight[0, 1] = 1.5
    assert torch.equal(recompute_mask(layer), torch.zeros(1, 8)), "nothing stowed: the zeros cannot come back"

    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, -1.0, 0.125, -0.5, 0.375, 0.25]]))
    stow_dropped(layer)
    recompute_mask(layer)
    assert layer.weight_dropped.tolist() == [[0.0, 0.0, 2.0, -1.0, 0.125, 0.0, 0.0, 0.25]], "stowed in the buffer"
    with torch.no_grad():
        layer.weight[0, 1] = 1.5
    recompute_mask(layer)
    assert layer.weight.tolist() == [[4.0, 0.0, 2.0, 0.0, 0.0, -0.5, 0.375, 0.0]], "2.0 came back, 1.5 went"
    assert layer.weight_dropped.tolist() == [[0.0, 1.5, 0.0, -1.0, 0.125, 0.0, 0.0, 0.25]], "the others stay frozen"
    assert "weight_dropped" in layer.state_dict(), "checkpoints carry the stowed weights"

def test_the_core_sparsifier_runs_asps_workflow_in_a_plain_pytorch_loop(tiny_fmnist):
    """No Lightning: attach, enforce, prune, recompute every 3 steps; the pattern holds in the weights and in AdamW's
    state, and without the enforcer the next step fills it in again."""
    tiny_fmnist.setup("fit")
    batches = list(itertools.islice(tiny_fmnist.train_dataloader(), 8))
    model = ResNet9(1, 10, width=8)
    sparsifier = Sparsifier24(recompute_every_n_steps=3)
    sparsifier.attach(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    sparsifier.enforce([optimizer])
    sparsifier.prune([optimizer], step=0)

    def train_step(step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        sparsifier.step([optimizer], step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for step, (x, y) in enumerate(batches[:7]):
        train_step(step, x, y)
    assert sparsifier.recomputed == 2 and sparsifier.masked_at_step == 6 and 0 < sparsifier.masks_changed < 0.5
    assert "prep.0" in sparsifier.skipped and len(sparsifier.layers) == 8, "the 1-channel input conv stays dense"
    for module in sparsifier.layers.values():
        state = [v for v in optimizer.state[module.weight].values() if v.shape == module.weight.shape]
        assert is_24(module.weight) and all((v[~module.weight_mask] == 0).all() for v in state)
    restored = Sparsifier24(recompute_every_n_steps=3)
    restored.load_state_dict(sparsifier.state_dict())
    assert restored.state_dict() == sparsifier.state_dict()
    sparsifier.remove()
    train_step(7, *batches[7])
    assert not any(is_24(m.weight) for m in sparsifier.layers.values()), "the enforcer was what kept the pattern"
