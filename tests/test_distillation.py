"""Distillation in real Lightning runs: the teacher is frozen, the student's loss gains the KL term."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from conftest import trainer_kwargs
from lightning_selfcompress import Distillation, SelfCompression
from lightning_selfcompress.core.distill import distillation_loss
from lightning_selfcompress.models import BaselineCNN, ImageClassifier


def test_the_loss_gradient_is_the_softened_probability_gap():
    student = torch.randn(8, 10, requires_grad=True)
    teacher = torch.randn(8, 10)
    distillation_loss(student, teacher, temperature=4.0).backward()
    expected = 4.0 * (F.softmax(student.detach() / 4, -1) - F.softmax(teacher / 4, -1)) / 8
    torch.testing.assert_close(student.grad, expected)
    assert distillation_loss(teacher, teacher, 2.0).abs() < 1e-6


class LossSpy(pl.Callback):
    """The loss the training step returned, and what was logged beside it."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.rows.append((float(outputs["loss"]), float(metrics["train/loss"]), float(metrics["distill/loss"])))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_teacher_is_frozen_and_the_students_loss_gains_the_kl_term(tiny_fmnist, tmp_path, precision):
    teacher = ImageClassifier(BaselineCNN(width=4))
    before = copy.deepcopy(teacher.state_dict())
    dtypes = []
    teacher.register_forward_hook(lambda m, args, out: dtypes.append((out.dtype, torch.is_grad_enabled(), m.training)))
    spy = LossSpy()
    callbacks = [SelfCompression(gamma=0.1), Distillation(teacher, weight=2.0, temperature=3.0), spy]
    student = ImageClassifier(BaselineCNN(width=4), lr=1e-3)
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=4, precision=precision))
    trainer.fit(student, tiny_fmnist)
    assert len(spy.rows) == 4
    for returned, task, distill in spy.rows:
        assert distill > 0 and returned == pytest.approx(task + distill, rel=1e-5)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters()), "no gradient reaches the teacher"
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items()), "the teacher does not change"
    expected = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    assert dtypes == [(expected, False, False)] * 4, "in the student's precision, without grad, in eval mode"
    assert "training_step" not in vars(student), "the module's own training_step again after fit"


def test_a_wrong_student_module_or_teacher_is_a_clear_error(tiny_fmnist, tmp_path):
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module"):
        Distillation("teacher.ckpt")
    with pytest.raises(ValueError, match="temperature=0 must be a finite number > 0"):
        Distillation(BaselineCNN(width=4), temperature=0)
    bad = Distillation(ImageClassifier(BaselineCNN(width=4)), student_module="net.nope")
    with pytest.raises(ValueError, match="student_module='net.nope' is not a submodule of ImageClassifier"):
        pl.Trainer(callbacks=[bad], **trainer_kwargs(tmp_path)).fit(ImageClassifier(BaselineCNN(width=4)), tiny_fmnist)
    never = Distillation(BaselineCNN(width=4), student_module="net.spare")
    student = ImageClassifier(BaselineCNN(width=4))
    student.net.spare = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match=r"The student module \(Linear\) was not called"):
        pl.Trainer(callbacks=[never], **trainer_kwargs(tmp_path)).fit(student, tiny_fmnist)
