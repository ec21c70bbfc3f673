"""Reading checkpoint files safely: tensors and plain containers only (`torch.load(weights_only=True)`), so that a
downloaded checkpoint (`init_from`, `load_compressed`, `lsc-check24`) cannot run code, and a file that is not a
checkpoint is named as such instead of failing deep inside the unpickler."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import SelfCompressError

__all__ = ["CheckpointError", "read_checkpoint"]


class CheckpointError(SelfCompressError, ValueError):
    """A file that is not a checkpoint this library can read safely."""


def read_checkpoint(path: str | Path) -> Any:
    """The checkpoint at `path`, on the CPU. Lightning's checkpoints and state_dicts (torchvision's .pth files too)
    hold only tensors and plain containers and load; anything else is a CheckpointError that says why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint '{path}' does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if unsafe is None:
            raise CheckpointError(
                f"'{path}' is not a PyTorch checkpoint that can be read (its pickle is damaged or of another "
                "format). Give a Lightning .ckpt or a state_dict saved with torch.save."
            ) from error
        raise CheckpointError(
            f"'{path}' holds Python objects other than tensors and plain containers (it names {unsafe.group(1)}). "
            "lightning_selfcompress loads checkpoints with weights_only=True, so that a file cannot run code when "
            "it is read. If you trust it, load it yourself and save its state_dict: "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], 'clean.pt')."
        ) from error
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file fails in many ways inside torch.load
        raise CheckpointError(
            f"'{path}' is not a PyTorch checkpoint that can be read ({type(error).__name__}: {error}). Give a "
            "Lightning .ckpt or a state_dict saved with torch.save; the file may be truncated or of another format."
        ) from error
