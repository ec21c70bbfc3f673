"""A plain image-classification LightningModule: the kind of unchanged user module our callbacks attach to."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from ..core.checks import check_choice

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULES = ("constant", "cosine", "step")


class ImageClassifier(pl.LightningModule):
    """Cross-entropy training of `net`, with accuracy on the validation and test sets.

    `schedule="cosine"` decays the learning rate to 0 over the trainer's `max_steps` (or estimated steps);
    `schedule="step"` divides it by 10 every `step_epochs` epochs (the original ResNet ImageNet schedule: 30).
    SGD uses momentum 0.9, Nesterov's unless `nesterov=False` (the original ResNet recipes use plain momentum).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: str = "constant",
        nesterov: bool = True,
        step_epochs: int = 30,
    ) -> None:
        super().__init__()
        check_choice("optimizer", optimizer, sorted(OPTIMIZERS))
        check_choice("schedule", schedule, SCHEDULES)
        if not isinstance(step_epochs, int) or step_epochs < 1:
            raise ValueError(f"step_epochs={step_epochs!r} must be an integer >= 1 (epochs between tenfold LR cuts).")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_accuracy(self(x), y)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test/accuracy", self.test_accuracy)

    def configure_optimizers(self):
        hp = self.hparams
        kwargs = {"momentum": 0.9, "nesterov": hp.nesterov} if hp.optimizer == "sgd" else {}
        optimizer = OPTIMIZERS[hp.optimizer](self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, **kwargs)
        if hp.schedule == "constant":
            return optimizer
        if hp.schedule == "step":
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_epochs, gamma=0.1)]
        steps = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(steps), 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
