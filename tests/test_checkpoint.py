"""Checkpoints are read safely (tensors and plain containers only) by every entry point, and a file that is not a
checkpoint is named as such."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from lightning_selfcompress.check24 import check_path
from lightning_selfcompress.core.checkpoint import CheckpointError, read_checkpoint
from lightning_selfcompress.core.surgery import load_compressed
from lightning_selfcompress.export_cli import run
from lightning_selfcompress.models import BaselineCNN, ImageClassifier
from lightning_selfcompress.train import _load_weights


class Payload:
    """What a malicious checkpoint carries: unpickling it would run code (here: write a file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def files(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint at all" * 10)
    unsafe = tmp_path / "unsafe.ckpt"
    marker = tmp_path / "ran"
    torch.save({"state_dict": BaselineCNN(1, 10, width=4).state_dict(), "extra": Payload(str(marker))}, unsafe)
    marker.unlink(missing_ok=True)  # torch.save pickled the payload without running it; be sure
    return garbage, unsafe, marker


def test_every_entry_point_names_a_file_that_is_not_a_checkpoint(files, tmp_path):
    garbage, _, _ = files
    module = ImageClassifier(BaselineCNN(1, 10, width=4))
    for read in (read_checkpoint, check_path, lambda p: load_compressed(module, p), lambda p: _load_weights(module, p)):
        with pytest.raises(CheckpointError, match="garbage.ckpt' is not a PyTorch checkpoint that can be read"):
            read(garbage)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}")
    options = {"int4": False, "calibrate_batches": 0, "tolerance": 1e-4, "engine": "auto"}
    cfg = OmegaConf.create({"checkpoint": str(garbage), "run_config": None, "output": str(tmp_path / "m.onnx"),
                            "options": options})  # fmt: skip
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        run(cfg)  # before the run's config is read or anything is exported
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(files):
    _, unsafe, marker = files
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors .* weights_only=True"):
        read_checkpoint(unsafe)
    assert not marker.exists(), "the payload did not run"
    with pytest.raises(CheckpointError, match="holds Python objects"):
        load_compressed(ImageClassifier(BaselineCNN(1, 10, width=4)), unsafe)
    assert not marker.exists()
