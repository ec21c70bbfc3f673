"""Every error the library raises on purpose derives from one base, and from the built-in of its kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_selfcompress import SelfCompressError
from lightning_selfcompress.core import ChannelGraph
from lightning_selfcompress.core.checkpoint import read_checkpoint


def test_a_garbage_checkpoint_and_an_untraceable_model_are_caught_by_the_one_base(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(SelfCompressError, match="garbage.ckpt"):
        read_checkpoint(garbage)
    with pytest.raises(ValueError):  # and still the built-in of its kind
        read_checkpoint(garbage)

    class Sorts(nn.Module):  # sorts across channels: no rule can follow that
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x).sort(dim=1).values

    with pytest.raises(SelfCompressError, match="cannot follow node 'sort'"):
        ChannelGraph(Sorts(), torch.randn(2, 3, 4, 4))


def test_every_named_error_of_the_library_derives_from_the_base():
    import lightning_selfcompress.core.checkpoint as checkpoint
    import lightning_selfcompress.core.export as export
    import lightning_selfcompress.core.groups as groups
    import lightning_selfcompress.core.onnx_rules as onnx_rules
    import lightning_selfcompress.core.parity as parity
    import lightning_selfcompress.core.tensorrt as tensorrt
    import lightning_selfcompress.extras as extras

    found = [
        value for module in (checkpoint, export, groups, onnx_rules, parity, tensorrt, extras)
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == module.__name__
    ]  # fmt: skip
    assert len(found) == 8 and all(issubclass(error, SelfCompressError) for error in found), found
