"""Lightning adapter for distillation: the user's training step, plus the distillation loss of its forward."""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from ..core.distill import Distiller

__all__ = ["Distillation"]


class Distillation(Callback):
    """Adds weight * T^2 * KL(teacher || student) to the loss the LightningModule's `training_step` returns.

    The teacher (a trained network, typically the float one) runs on exactly the inputs of `student_module`'s
    forward, without gradients and in the same precision context; the LightningModule is not changed (its
    `training_step` is wrapped on the instance for the duration of `fit`). Logs `distill/loss`.

    Args:
        teacher: the trained network, called like the student module.
        weight: factor of the distillation loss beside the user's loss.
        temperature: softmax temperature T.
        student_module: qualified name of the student's submodule whose output is the logits ("": the
            LightningModule itself, whose `forward` the training step calls).
    """

    def __init__(
        self, teacher: nn.Module, weight: float = 1.0, temperature: float = 4.0, student_module: str = ""
    ) -> None:
        self.distiller = Distiller(nn.Identity(), teacher, weight, temperature)  # the student is known at fit start
        self.student_module = student_module

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            student = pl_module.get_submodule(self.student_module)
        except AttributeError as error:
            raise ValueError(
                f"student_module={self.student_module!r} is not a submodule of {type(pl_module).__name__}: {error}"
            ) from error
        self.distiller.student = student
        self.distiller.teacher.to(device=pl_module.device, dtype=pl_module.dtype)
        user_step = pl_module.training_step

        @functools.wraps(user_step)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            with self.distiller:
                output = user_step(*args, **kwargs)
            if output is None:  # the user skipped this batch
                return output
            extra = self.distiller.loss()
            pl_module.log("distill/loss", extra.detach(), on_step=True, on_epoch=False)
            if isinstance(output, Tensor):
                return output + extra
            return {**output, "loss": output["loss"] + extra}

        pl_module.training_step = training_step

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and "training_step" in vars(pl_module):
            del pl_module.training_step  # the class's own method again
