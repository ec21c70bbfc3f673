"""Run by tests/test_surgeon.py: cut channels while training, on `devices` CPU processes (DDP, gloo) or in one, at
`batch` images per process; optionally resumed from a checkpoint. The network has no BatchNorm: under DDP its
statistics are per process, and torch's SyncBatchNorm runs on GPUs only. Rank 0 writes what the run ended
with, and the checkpoint of step 8, so the test can compare runs weight by weight.

    python ddp_surgery.py OUT DEVICES BATCH [CHECKPOINT]

With LSC_WIDTHS set (a ChannelSurgeon `widths` backend), the surgeon cuts to latency steps under a width pressure,
each rank with a latency cache of its own (OUT/cache<rank>). With LSC_INT8_ACTIVATIONS=tensorrt (or onnxruntime), each layer's
input after the first is int8 with a learned step too, trained for that runtime.
"""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_selfcompress import ChannelSurgeon, SelfCompression
from lightning_selfcompress.data import FashionMNISTDataModule
from lightning_selfcompress.models import ImageClassifier

out, devices, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resume = sys.argv[4] if len(sys.argv) > 4 else None
widths = os.environ.get("LSC_WIDTHS", "any")
runtime = os.environ.get("LSC_INT8_ACTIVATIONS")  # the runtime int8 activation steps train for, if any
os.environ["XDG_CACHE_HOME"] = f"{out}/cache{os.environ.get('LOCAL_RANK', '0')}"  # DDP's launcher sets it on rank 1
pl.seed_everything(0, verbose=False)
net = nn.Sequential(
    nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
)  # fmt: skip
module = ImageClassifier(net, optimizer="adam", lr=0.003)
surgeon = ChannelSurgeon(every_n_steps=4, constant_pull=0.01, widths=widths, width_pressure=0.01 * (widths != "any"))
at_step_8 = ModelCheckpoint(out, "step{step}", every_n_train_steps=8, save_top_k=-1, auto_insert_metric_name=False)
parallel = {"strategy": "ddp"} if devices > 1 else {}
trainer = pl.Trainer(
    accelerator="cpu", devices=devices, max_steps=16, logger=False, enable_progress_bar=False,
    enable_model_summary=False, limit_val_batches=0, default_root_dir=out, **parallel,
    callbacks=[SelfCompression(gamma=2.0, init_bits=2.0, quantizer_lr=0.3, int8_activations=bool(runtime),
                               activation_runtime=runtime or "tensorrt"), surgeon,
               at_step_8],
)  # fmt: skip
trainer.fit(module, FashionMNISTDataModule(batch_size=batch, val_size=256, limit_train=512), ckpt_path=resume)
weights = {name: p.detach().flatten().tolist() for name, p in module.named_parameters()}
cuts = [(r.step, [list(g) for g in r.groups]) for r in surgeon.history]
grids = {name: bool(b) for name, b in module.named_buffers() if name.endswith("input_quantizer.unsigned")}
with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"cuts": cuts, "weights": weights, "grids": grids, "steps": trainer.global_step,
               "widths": surgeon.step_widths}, f)  # fmt: skip
