"""ChannelSurgeon in real Lightning runs on Fashion-MNIST: cutting while training, resume, load_compressed, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, StochasticWeightAveraging

from lightning_selfcompress import ChannelSurgeon, SelfCompression, load_compressed
from lightning_selfcompress.core.checkpoint import read_checkpoint
from lightning_selfcompress.core.size import LayerShape
from lightning_selfcompress.models import BaselineCNN, ImageClassifier, ResNet9

from conftest import trainer_kwargs


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


NETS = {"baseline_cnn": lambda: BaselineCNN(1, 10, width=8), "resnet9": lambda: ResNet9(1, 10, width=4)}


def module(net: str = "baseline_cnn") -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    return ImageClassifier(NETS[net](), optimizer="adam", lr=0.003)


def callbacks(every: int = 8) -> list[Callback]:
    # a strong size term so that channels die within a few steps
    return [SelfCompression(gamma=2.0, init_bits=2.0, quantizer_lr=0.3), ChannelSurgeon(every_n_steps=every, constant_pull=0.01)]


def test_the_surgeon_cuts_while_training_and_the_optimizer_follows(tiny_fmnist, tmp_path):
    net_module = module()
    compression, surgeon = callbacks()
    trainer = pl.Trainer(callbacks=[compression, surgeon], **trainer_kwargs(tmp_path, max_steps=32))
    trainer.fit(net_module, tiny_fmnist)
    assert surgeon.history, "channels were removed"
    rows = surgeon.summary(net_module)
    total = LayerShape.total(rows)
    assert total.channels_alive < total.channels
    optimizer = trainer.optimizers[0]
    for p in net_module.parameters():
        for value in optimizer.state[p].values():
            assert value.dim() == 0 or value.shape == p.shape
    report = compression.report()
    assert report.float_weights == total.weights, "size stays measured against the float net"
    assert report.weights_kept <= total.weights_kept
    # one denominator everywhere: each row and the total count the original network's channels and weights
    assert [(layer.channels, layer.weights) for layer in report.layers] == [(r.channels, r.weights) for r in rows]
    assert report.channels == total.channels > report.channels_alive


def test_each_surgery_is_logged_once(tiny_fmnist, tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    net_module, (compression, surgeon) = module(), callbacks(every=4)
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = pl.Trainer(callbacks=[compression, surgeon], **trainer_kwargs(tmp_path, max_steps=24, logger=logger,
                                                                             log_every_n_steps=2))  # fmt: skip
    trainer.fit(net_module, tiny_fmnist)
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    logged = [float(r["surgeon/channels_removed"]) for r in rows if r.get("surgeon/channels_removed")]
    assert len(surgeon.history) >= 2 and len(logged) == len(surgeon.history)
    assert sum(logged) == sum(sum(r.channels.values()) for r in surgeon.history)


@pytest.mark.parametrize("net", list(NETS))
def test_a_resumed_run_gives_the_losses_of_an_uninterrupted_one(tiny_fmnist, tmp_path, net):
    """512 images in batches of 32: 16 steps an epoch; the run stops after epoch 2 (step 32) and resumes to 48.
    ResNet-9 also loses channels from its residual branch alone (re-embedded), which the resume must replay."""
    whole = LossRecorder()
    first_surgeon = callbacks()
    pl.Trainer(callbacks=[*first_surgeon, whole], **trainer_kwargs(tmp_path / "a", max_steps=48)).fit(module(net), tiny_fmnist)

    first = LossRecorder()
    part = callbacks()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=32, save_top_k=-1)
    trainer = pl.Trainer(callbacks=[*part, first, saver], **trainer_kwargs(tmp_path / "b", max_steps=32, enable_checkpointing=True))
    trainer.fit(module(net), tiny_fmnist)
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert part[1].history, "the checkpoint is taken after a surgery"
    assert any(r.branches for r in part[1].history) == (net == "resnet9")

    resumed = LossRecorder()
    fresh_callbacks = callbacks()
    pl.Trainer(callbacks=[*fresh_callbacks, resumed], **trainer_kwargs(tmp_path / "c", max_steps=48)).fit(
        module(net), tiny_fmnist, ckpt_path=path
    )
    cuts = lambda surgeon: [(r.step, r.groups, r.branches) for r in surgeon.history]  # noqa: E731
    assert cuts(fresh_callbacks[1]) == cuts(first_surgeon[1])
    later = sorted(resumed.losses)
    assert later[0] == 33
    assert [resumed.losses[s] for s in later] == pytest.approx([whole.losses[s] for s in later], rel=1e-6)


def test_a_run_resumed_mid_epoch_goes_on_with_the_batches_it_had_not_seen(tiny_fmnist, tmp_path):
    """16 steps an epoch; the checkpoint is taken at step 24, half-way through epoch 1 and after 6 surgeries: the
    resumed run trains on batches 8..15 of that epoch, as the uninterrupted one does, with the same losses."""
    whole = LossRecorder()
    pl.Trainer(callbacks=[*callbacks(every=4), whole], **trainer_kwargs(tmp_path / "a", max_steps=40)).fit(
        module(), tiny_fmnist
    )
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=24, save_top_k=-1)
    part = callbacks(every=4)
    trainer = pl.Trainer(callbacks=[*part, saver], **trainer_kwargs(tmp_path / "b", max_steps=24, enable_checkpointing=True))
    trainer.fit(module(), tiny_fmnist)
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert part[1].history, "the checkpoint is taken after surgeries"
    resumed = LossRecorder()
    pl.Trainer(callbacks=[*callbacks(every=4), resumed], **trainer_kwargs(tmp_path / "c", max_steps=40)).fit(
        module(), tiny_fmnist, ckpt_path=path
    )
    later = sorted(resumed.losses)
    assert later == list(range(25, 41)), "16 more steps: the rest of epoch 1, then epoch 2"
    assert [resumed.losses[s] for s in later] == pytest.approx([whole.losses[s] for s in later], rel=1e-6)


@pytest.mark.parametrize("net", list(NETS))
def test_load_compressed_rebuilds_a_trained_module_from_its_checkpoint(tiny_fmnist, tmp_path, net):
    net_module = module(net)
    trainer = pl.Trainer(callbacks=callbacks(), **trainer_kwargs(tmp_path, max_steps=16))
    trainer.fit(net_module, tiny_fmnist)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = read_checkpoint(tmp_path / "last.ckpt")
    assert saved["surgery"]["history"] and not any("Surgeon" in key for key in saved["callbacks"]), (
        "the history sits beside the weights, where load_compressed reads it, not in Lightning's callback slot"
    )
    loaded = load_compressed(module(net), tmp_path / "last.ckpt")
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), net_module.eval()(x), rtol=0, atol=0)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in module(net).parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(every_n_steps=0), "every_n_steps=0 must be a positive integer"),
        (dict(every_n_steps=None), "would never run"),
        (dict(constant_pull=-1.0), "constant_pull=-1.0 must be >= 0"),
        (dict(atol=float("nan")), "atol=nan must be >= 0"),
        (dict(exclude="fc"), "exclude='fc' must be a list of glob patterns"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ChannelSurgeon(**kwargs)


def test_weight_averaging_is_refused_with_a_clear_message(tiny_fmnist, tmp_path):
    trainer = pl.Trainer(
        callbacks=[*callbacks(), StochasticWeightAveraging(swa_lrs=0.01)], **trainer_kwargs(tmp_path, max_steps=2)
    )
    with pytest.raises(RuntimeError, match="cannot be combined with \\['StochasticWeightAveraging'\\]"):
        trainer.fit(module(), tiny_fmnist)


def test_lbfgs_is_refused_before_the_first_step(tiny_fmnist, tmp_path):
    class WithLBFGS(ImageClassifier):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=2)

    pl.seed_everything(0, verbose=False)
    net_module, seen = WithLBFGS(BaselineCNN(1, 10, width=8)), LossRecorder()
    trainer = pl.Trainer(callbacks=[*callbacks(), seen], **trainer_kwargs(tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="ChannelSurgeon cannot cut channels under torch.optim.LBFGS"):
        trainer.fit(net_module, tiny_fmnist)
    assert not seen.losses, "refused before training"


@pytest.mark.slow
def test_a_checkpoint_from_before_later_cuts_cannot_be_loaded_into_the_cut_module(tiny_fmnist, tmp_path):
    net_module, chosen = module(), callbacks(every=8)
    first = pl.Trainer(callbacks=chosen, **trainer_kwargs(tmp_path, max_steps=8))
    first.fit(net_module, tiny_fmnist)
    first.save_checkpoint(tmp_path / "early.ckpt")
    later = pl.Trainer(callbacks=chosen, **trainer_kwargs(tmp_path, max_steps=32))
    later.fit(net_module, tiny_fmnist, ckpt_path=tmp_path / "early.ckpt")
    assert len(chosen[1].history) > 1, "cut again after the early checkpoint"
    with pytest.raises(RuntimeError, match="cut channels cannot be put back"):
        later.test(net_module, tiny_fmnist, ckpt_path=tmp_path / "early.ckpt", verbose=False)
    fresh = pl.Trainer(callbacks=callbacks(), **trainer_kwargs(tmp_path))
    fresh.test(module(), tiny_fmnist, ckpt_path=tmp_path / "early.ckpt", verbose=False)  # a fresh module works


def run_ddp_script(out: Path, devices: int, batch: int, *resume: Path, **env: str) -> list[dict]:
    """tests/scripts/ddp_surgery.py in a process of its own; what each rank ended with."""
    out.mkdir()
    command = [sys.executable, str(Path(__file__).parent / "scripts" / "ddp_surgery.py"), str(out), str(devices),
               str(batch), *map(str, resume)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


@pytest.mark.slow
def test_under_ddp_two_processes_train_as_one_process_with_their_global_batch(tmp_path):
    """Two CPU processes (gloo) at 32 images each end with the cuts and the weights of one process at 64, and so does
    one process resumed from the two's checkpoint: rank 0's decision is broadcast, DDP is wrapped anew after each
    cut, and the samplers deal each rank its slice of the single process's batches."""
    two = run_ddp_script(tmp_path / "two", 2, 32)
    one = run_ddp_script(tmp_path / "one", 1, 64)
    resumed = run_ddp_script(tmp_path / "resumed", 1, 64, tmp_path / "two" / "step8.ckpt")
    assert two[0]["cuts"], "channels were cut"
    for other in (two[1], one[0], resumed[0]):
        assert other["steps"] == 16 and other["cuts"] == two[0]["cuts"]
        for name, weights in two[0]["weights"].items():
            assert other["weights"][name] == pytest.approx(weights, abs=1e-5), name


@pytest.mark.slow
def test_under_ddp_the_latency_steps_are_rank_zeros(tmp_path):
    """With latency steps and their pressure, rank 0 alone times the tables (rank 1's cache stays empty) and both
    ranks push and cut to its steps, so that their weights stay equal."""
    ranks = run_ddp_script(tmp_path / "two", 2, 32, LSC_WIDTHS="onnxruntime-cpu")
    assert ranks[0]["widths"] and ranks[1]["widths"] == ranks[0]["widths"]
    caches = tmp_path / "two"
    assert list((caches / "cache0").rglob("*.json")) and not list((caches / "cache1").rglob("*.json"))
    assert ranks[1]["cuts"] == ranks[0]["cuts"]
    for name, weights in ranks[0]["weights"].items():
        assert ranks[1]["weights"][name] == pytest.approx(weights, abs=1e-5), name


@pytest.mark.slow
def test_under_ddp_int8_activation_steps_start_as_one_process_would_start_them(tmp_path):
    """Each step starts at max|x| / 255 of the global batch on the uint8 grid (ONNX Runtime's, the ReLU'd inputs; the
    ranks' extremes reduced), so two processes at 32 images choose the grids and train their steps and weights as one
    process at 64 does."""
    two = run_ddp_script(tmp_path / "two", 2, 32, LSC_INT8_ACTIVATIONS="onnxruntime")
    one = run_ddp_script(tmp_path / "one", 1, 64, LSC_INT8_ACTIVATIONS="onnxruntime")
    steps = [name for name in one[0]["weights"] if name.endswith("input_quantizer.log2_scale")]
    assert len(steps) == 2, one[0]["weights"].keys()  # the first layer reads the image in float
    assert len(one[0]["grids"]) == 2 and all(one[0]["grids"].values()), one[0]["grids"]
    for other in (two[0], two[1]):
        assert other["cuts"] == one[0]["cuts"] and other["grids"] == one[0]["grids"]
        for name, weights in one[0]["weights"].items():  # float sums in another order move a rounding now and then
            assert other["weights"][name] == pytest.approx(weights, abs=1e-4), name
