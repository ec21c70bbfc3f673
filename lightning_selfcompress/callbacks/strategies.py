"""The strategies under which the callbacks that change a model's parameters are sound: one device, or DDP with a
process of its own per rank (the replicas stay whole, so quantizers, masks and cuts apply to each alike)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

__all__ = ["check_strategy"]


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
