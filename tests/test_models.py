"""The reference networks: shapes, parameter counts of the published layouts, and the width knob."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from conftest import trainer_kwargs
from lightning_selfcompress.models import BaselineCNN, ImageClassifier, ResNet9


def test_baseline_cnn_layout_and_output():
    net = BaselineCNN()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 32, (5, 5)), (32, 32, (5, 5)), (32, 64, (3, 3)), (64, 64, (3, 3)), (576, 10, (1, 1)),
    ]
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_resnet9_layout_and_output():
    net = ResNet9()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 128, 128, 256, 512, 512, 512]
    assert net.linear.in_features == 512 and net.linear.bias is None and net.scale == 0.125
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert ResNet9(in_channels=1, width=4)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("cls", [BaselineCNN, ResNet9])
def test_width_must_be_positive(cls):
    with pytest.raises(ValueError, match="width=0"):
        cls(width=0)


def test_the_step_schedule_cuts_the_learning_rate_tenfold_every_step_epochs(tiny_fmnist, tmp_path):
    module = ImageClassifier(BaselineCNN(width=4), optimizer="sgd", lr=0.01, schedule="step", step_epochs=2,
                             nesterov=False)  # fmt: skip
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_steps=-1, max_epochs=3, limit_train_batches=2))
    trainer.fit(module, tiny_fmnist)
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == pytest.approx(0.001) and group["momentum"] == 0.9 and group["nesterov"] is False
    with pytest.raises(ValueError, match="step_epochs=0 must be an integer >= 1"):
        ImageClassifier(BaselineCNN(), schedule="step", step_epochs=0)
