"""The input a model's forward takes, for tracing, calibration and export: picked from a training batch, and described
by type and shape in every error, so that a user sees what was found and what to give instead."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

__all__ = ["describe", "image_batch", "model_input"]

HINT = (
    "Set `example_input_array` on the LightningModule (or pass `example_input`) to one batch of what forward takes, "
    "e.g. torch.zeros(2, 3, 32, 32)."
)


def describe(value: Any) -> str:
    """A short description of a batch or input: 'a tensor of shape (2, 3, 32, 32)', "a dict with keys ['image']"."""
    if isinstance(value, Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {list(value)} ({', '.join(f'{k!r}: {describe(v)}' for k, v in value.items())})"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(describe(v) for v in value)})"
    return f"a {type(value).__name__}"


def image_batch(batch: Any) -> Tensor | None:
    """The batch's input: the batch itself if it is a tensor, else its first floating-point tensor of at least 2 dims
    [batch, channels, ...] (so not its integer or 1-D labels), looking inside dicts, tuples and lists."""
    if isinstance(batch, Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, Sequence) else ()
    tensors = [v for v in values if isinstance(v, Tensor)]
    return next((t for t in tensors if t.dim() >= 2 and t.is_floating_point()), None)


def model_input(model: nn.Module, batch: Any, who: str) -> Tensor:
    """What `who` traces `model` with: its `example_input_array` if it has one, else the batch's `image_batch`."""
    example = getattr(model, "example_input_array", None)
    if example is not None:
        if isinstance(example, Tensor) and example.dim() >= 2:
            return example
        raise ValueError(
            f"{who} traces forward(x) with one tensor [batch, channels, ...], and {type(model).__name__}."
            f"example_input_array is {describe(example)}. {HINT}"
        )
    found = image_batch(batch)
    if found is None:
        raise ValueError(
            f"{who} needs the tensor {type(model).__name__}.forward takes, and the training batch ({describe(batch)}) "
            f"holds no floating-point tensor of at least 2 dims [batch, channels, ...]. {HINT}"
        )
    return found
