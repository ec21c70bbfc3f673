"""Run by tests/test_surgeon.py: two CPU processes under DDP cut channels while training. Each rank writes what it
ended with, so the test can check that both took the same decisions and kept identical weights."""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl

from lightning_selfcompress import ChannelSurgeon, SelfCompression
from lightning_selfcompress.data import FashionMNISTDataModule
from lightning_selfcompress.models import BaselineCNN, ImageClassifier

out = sys.argv[1]
pl.seed_everything(0, verbose=False)
module = ImageClassifier(BaselineCNN(1, 10, width=8), optimizer="adam", lr=0.003)
surgeon = ChannelSurgeon(every_n_steps=4, constant_pull=0.01)
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_steps=16, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=out,
    callbacks=[SelfCompression(gamma=2.0, init_bits=2.0, quantizer_lr=0.3), surgeon],
)  # fmt: skip
trainer.fit(module, FashionMNISTDataModule(batch_size=32, val_size=256, limit_train=512))
digest = {name: float(p.detach().double().sum()) for name, p in module.named_parameters()}
shapes = {name: list(p.shape) for name, p in module.named_parameters()}
cuts = [(r.step, [list(g) for g in r.groups]) for r in surgeon.history]
with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"cuts": cuts, "shapes": shapes, "digest": digest, "steps": trainer.global_step}, f)
