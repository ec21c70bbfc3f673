"""SelfCompressor, the plain-PyTorch core that SelfCompression drives, in a loop of its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_selfcompress.core import SelfCompressor
from lightning_selfcompress.models import BaselineCNN


def train(compressor: SelfCompressor, steps: int = 12) -> BaselineCNN:
    torch.manual_seed(0)
    model = BaselineCNN(width=4)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    compressor.attach(model, x)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    compressor.use(optimizer)
    for step in range(steps):
        compressor.start_step(step, steps)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        compressor.add_size_gradient(optimizer)
        optimizer.step()
        compressor.end_step()
    compressor.finish()
    return model


def test_min_bits_trades_bits_between_channels_without_killing_any():
    """A size term strong enough to kill every channel: with min_bits=1 each keeps its one bit (binary weights on the
    mid-rise grid), without it channels die."""
    options = dict(gamma=50.0, init_bits=2.0, grid="midrise", quantizer_lr=0.2)
    floored = SelfCompressor(min_bits=1.0, **options)
    train(floored)
    bits = torch.cat([m.weight_quantizer.bits.detach() for m in floored.size.layers.values()])
    assert bits.min() == 1.0 and floored.report().channels_alive == floored.report().channels
    free = SelfCompressor(**options)
    train(free)
    assert free.report().channels_alive < free.report().channels, "without the floor the same pull kills channels"


@pytest.mark.parametrize("min_bits", [0.0, 3.0, float("nan")])
def test_a_min_bits_outside_zero_to_init_bits_is_named(min_bits):
    with pytest.raises(ValueError, match=f"min_bits={min_bits} must be a number in \\(0, init_bits=2.0\\]"):
        SelfCompressor(init_bits=2.0, min_bits=min_bits)


def test_an_optimizer_without_the_quantizers_is_refused_by_name():
    compressor = SelfCompressor()
    model = BaselineCNN(width=4)
    compressor.attach(model)
    float_only = torch.optim.SGD([p for n, p in model.named_parameters() if "weight_quantizer" not in n], lr=0.1)
    with pytest.raises(RuntimeError, match=r"No optimizer holds the quantizer parameters \['features.0"):
        compressor.use(float_only)


def test_a_compressor_used_before_it_is_attached_says_so():
    with pytest.raises(RuntimeError, match=r"attach\(model\) first"):
        SelfCompressor().use(torch.optim.SGD(BaselineCNN(width=4).parameters(), lr=0.1))
