"""The strategies under which the callbacks that change a model's parameters are sound: one device, or DDP with a
process of its own per rank (the replicas stay whole, so quantizers, masks and cuts apply to each alike); and the type
a strategy's precision computes in."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

__all__ = ["check_strategy", "half_dtype"]

HALF = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16, "16-true": torch.float16, "bf16-true": torch.bfloat16}


def check_strategy(trainer: pl.Trainer, who: str) -> None:
    """Refuse, naming `who`, a strategy that shards or wraps parameters (FSDP, DeepSpeed, model parallel), and
    ddp_spawn / ddp_fork, which load rank 0's weights back into a model in the launching process that never got the
    quantizers, masks or cuts."""
    strategy = trainer.strategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise RuntimeError(
            f"{who} supports one device or the DDP strategy; {type(strategy).__name__} shards or wraps parameters in "
            "ways it cannot follow. Use strategy='ddp' (or one device)."
        )
    if isinstance(getattr(strategy, "launcher", None), _MultiProcessingLauncher):
        raise RuntimeError(
            f"{who} cannot run under ddp_spawn or ddp_fork: they hand rank 0's weights back to the model in the "
            "launching process, which never got its changes. Use strategy='ddp'."
        )


def half_dtype(trainer: pl.Trainer) -> torch.dtype | None:
    """The half type the trainer's convolutions compute in (mixed or true precision), or None for float32 and up:
    PyTorch's latency tables are timed in it, since a GPU's half kernels step at other widths than its float32 ones."""
    return HALF.get(str(getattr(trainer.strategy.precision_plugin, "precision", "32-true")))
