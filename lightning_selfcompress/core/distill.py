"""Knowledge distillation (Hinton et al., 2015) from a frozen teacher, without touching the student's code.

A forward hook on the student module that produces the logits records its inputs and outputs; the teacher runs on
the same inputs, under no_grad, in whatever precision context the student's forward ran in. The loss to add is
weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)): the T^2 keeps its gradients on the scale of the
cross-entropy's whatever the temperature.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Distiller", "distillation_loss"]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(teacher || student) over softened class distributions (last dimension), averaged over the batch."""
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_student.flatten(0, -2), log_teacher.flatten(0, -2), log_target=True, reduction="batchmean")
    return temperature**2 * kl


class Distiller:
    """Distils `teacher` into `student` (the module whose output is the logits).

    Use as a context around one training forward: `with distiller: loss = task_loss(student(x))`, then
    `loss + distiller.loss()`. The teacher is frozen (eval mode, no gradient) and is not a submodule of the student,
    so it is in neither the student's optimizer nor its checkpoints.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, weight: float = 1.0, temperature: float = 4.0) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module (a trained network), got {type(teacher).__name__}.")
        for name, value in (("weight", weight), ("temperature", temperature)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a finite number > 0.")
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight = float(weight)
        self.temperature = float(temperature)
        self._pairs: list[tuple[Tensor, Tensor]] = []
        self._handle: Any = None

    def __enter__(self) -> Distiller:
        self._pairs = []
        self._handle = self.student.register_forward_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"Distillation needs the logits as one tensor, but {type(module).__name__} returned "
                f"{type(output).__name__}: point it at the module whose output is the logits."
            )
        self.teacher.train(False)
        with torch.no_grad():
            teacher_output = self.teacher(*args, **kwargs)
        self._pairs.append((output, teacher_output))

    def loss(self) -> Tensor:
        """weight x the distillation loss of the forwards recorded since entering (their mean, for several)."""
        if not self._pairs:
            raise RuntimeError(
                f"The student module ({type(self.student).__name__}) was not called inside the distillation context: "
                "distil from the module the training step calls to get its logits."
            )
        losses = [distillation_loss(s, t, self.temperature) for s, t in self._pairs]
        return self.weight * torch.stack(losses).mean()
