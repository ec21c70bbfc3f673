"""Every error the library raises on purpose derives from one base, and from the built-in of its kind."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_selfcompress import ChannelSurgeon, SelfCompressError, SelfCompression, Sparsity24
from lightning_selfcompress.core import ChannelGraph
from lightning_selfcompress.core.checkpoint import read_checkpoint
from lightning_selfcompress.core.quant import QuantizationConfig
from lightning_selfcompress.core.size import GammaSchedule
from lightning_selfcompress.export_report import ExportOptions
from lightning_selfcompress.models import BaselineCNN, ImageClassifier
from lightning_selfcompress.report import write_json


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


@pytest.mark.parametrize(
    "callback, arguments, name",
    [
        ("ChannelSurgeon", {}, "every_n_steps"),
        ("ChannelSurgeon", {}, "latency_batch"),
        ("Sparsity24", {}, "start_step"),
        ("Sparsity24", {"start_step": 0}, "recompute_every_n_steps"),
    ],
)
def test_a_count_is_checked_alike_everywhere_and_true_is_not_a_count(callback, arguments, name):
    import lightning_selfcompress

    def build(value):
        return getattr(lightning_selfcompress, callback)(**arguments, **{name: value})

    for bad in (True, 1.5, -1):
        with pytest.raises(ValueError, match=f"^{name}={bad!r} must be (a positive integer|an integer >= 0)"):
            build(bad)
    build(2)


def test_a_flag_is_checked_alike_everywhere():
    from lightning_selfcompress import ChannelSurgeon, SelfCompression, Sparsity24

    for build, name in ((lambda v: SelfCompression(learn_bits=v), "learn_bits"),
                        (lambda v: SelfCompression(int8_activations=v), "int8_activations"),
                        (lambda v: Sparsity24(0, permute=v), "permute"),
                        (lambda v: ChannelSurgeon(on_epoch_end=v), "on_epoch_end")):  # fmt: skip
        with pytest.raises(TypeError, match=f"^{name}=1 must be True or False"):
            build(1)


@pytest.mark.parametrize("options", [ExportOptions, GammaSchedule, QuantizationConfig])
def test_option_dataclasses_are_built_by_keyword(options):
    """A positional value would bind to whichever field comes first, and to another one once a field is added."""
    with pytest.raises(TypeError, match="positional"):
        options(0.5)


def test_a_full_disk_names_the_file_and_leaves_what_was_there(tmp_path, monkeypatch):
    """A disk that fills while the report is written: the error names the path, the old report stays whole and no
    temporary file is left behind. (The disk is made full by failing the write the way a full disk fails it.)"""
    report = tmp_path / "report.json"
    write_json(report, {"accuracy": 0.9})

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(SelfCompressError, match=r"Could not write '.*report.json': No space left on device") as caught:
        write_json(report, {"accuracy": 0.95})
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert json.loads(report.read_text()) == {"accuracy": 0.9}, "the old report is whole"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"], "no temporary file is left"


@pytest.mark.parametrize("callback", [SelfCompression, ChannelSurgeon, lambda: Sparsity24(start_step=0)])
@pytest.mark.parametrize(("strategy", "message"), [
    (lambda: dict(devices=2, strategy="ddp_spawn"), "cannot run under ddp_spawn or ddp_fork.*Use strategy='ddp'"),
    (lambda: dict(devices=1, strategy=ModelParallelStrategy()), "ModelParallelStrategy shards or wraps parameters"),
])  # fmt: skip
def test_strategies_that_would_lose_or_shard_the_changes_are_refused_by_name(callback, strategy, message):
    """ddp_spawn loads rank 0's weights back into the launching process's model, which never got the quantizers, masks
    or cuts; model parallelism and FSDP shard the parameters they change (FSDP needs a GPU even to be built)."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, **strategy())
    with pytest.raises(RuntimeError, match=message):
        callback().setup(trainer, ImageClassifier(BaselineCNN(width=4)), "fit")


def test_a_write_error_without_an_errno_reads_as_its_message(tmp_path, monkeypatch):
    def fails(self, *args, **kwargs):
        raise OSError("the network share went away")

    monkeypatch.setattr(Path, "write_text", fails)
    with pytest.raises(SelfCompressError) as caught:
        write_json(tmp_path / "report.json", {})
    assert str(caught.value).startswith("Could not write") and "Errno" not in str(caught.value)
