"""Own learning rate and weight decay for the quantizer parameters, without touching the user's param groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_selfcompress.core.optim import HyperparameterOverride


def make(optimizer_cls=torch.optim.SGD, **kwargs):
    weight, bits = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    optimizer = optimizer_cls([weight, bits], **kwargs)
    return weight, bits, optimizer


def step(optimizer, *params, grad=1.0):
    for p in params:
        p.grad = torch.full_like(p, grad)
    optimizer.step()


def test_lr_follows_the_groups_schedule_in_proportion():
    weight, bits, optimizer = make(lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)
    override = HyperparameterOverride(optimizer, [bits], lr=1.0, weight_decay=0.0)
    step(optimizer, weight, bits)
    assert weight.tolist() == pytest.approx([0.9] * 3) and bits.tolist() == pytest.approx([0.0] * 2)
    scheduler.step()  # group lr halves: 0.05, so the quantizer lr becomes 0.5
    step(optimizer, weight, bits)
    assert weight.tolist() == pytest.approx([0.85] * 3) and bits.tolist() == pytest.approx([-0.5] * 2)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["params"] == [weight, bits]
    override.remove()
    step(optimizer, weight, bits)
    assert bits.tolist() == pytest.approx([-0.55] * 2), "removed: back to the group's own lr"


def test_weight_decay_is_overridden_and_state_dict_keeps_the_users_layout():
    weight, bits, optimizer = make(torch.optim.AdamW, lr=0.1, weight_decay=0.5)
    layout = optimizer.state_dict()["param_groups"]
    HyperparameterOverride(optimizer, [bits], lr=None, weight_decay=0.0)
    step(optimizer, weight, bits, grad=0.0)
    assert weight.tolist() == pytest.approx([0.95] * 3) and bits.tolist() == [1.0, 1.0]
    state = optimizer.state_dict()
    assert [g["params"] for g in state["param_groups"]] == [g["params"] for g in layout]
    assert set(state["state"]) == {0, 1}, "Adam moments for both parameters, keyed as the user built them"
    fresh_weight, fresh_bits, fresh = make(torch.optim.AdamW, lr=0.1, weight_decay=0.5)
    fresh.load_state_dict(state)


def test_a_warm_up_schedule_never_lifts_the_quantizer_rate_past_its_own():
    """OneCycleLR starts at max_lr / 25 (its initial_lr): the quantizer rate follows the cycle's shape, peaking at
    `lr`, instead of being multiplied up to 25 times."""
    weight, bits, optimizer = make(torch.optim.SGD, lr=0.1)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=20, cycle_momentum=False)
    HyperparameterOverride(optimizer, [bits], lr=1.0, weight_decay=0.0)
    rates = []
    for _ in range(20):
        before = bits.detach().clone()
        step(optimizer, weight, bits)  # SGD, gradient 1: the step is the rate
        rates.append(float(before[0] - bits.detach()[0]))
        scheduler.step()
    assert max(rates) == pytest.approx(1.0, rel=1e-6)
    assert rates[0] == pytest.approx(1.0 / 25, rel=1e-6), "the cycle's start: max_lr / 25, not 1"
    assert rates[-1] < 0.01, "and its annealed end"
