"""The size that counts (whole bits per channel), the fixed-bit baseline and the whole-bit phase, in real runs."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import onnx
import pytest
import torch

from conftest import trainer_kwargs
from lightning_selfcompress import CompressedExport, SelfCompression
from lightning_selfcompress.core.export import stored_weight_bits
from lightning_selfcompress.core.quant import (
    QuantizationConfig,
    attach_quantizers,
    integer_bits,
    integer_weights,
    quantized_layers,
    snap_bits,
)
from lightning_selfcompress.models import BaselineCNN, ImageClassifier


def test_integer_bits_is_the_signed_width_of_each_channels_integers():
    integers = torch.tensor([[-1.0, 0.0], [-2.0, 1.0], [0.0, 1.0], [-3.0, 2.0], [0.0, 0.0], [-128.0, 127.0], [4.0, 0]])
    assert integer_bits(integers).tolist() == [1, 2, 2, 3, 0, 8, 4]


def test_a_channel_of_odd_integers_stores_its_midrise_levels():
    odd = torch.tensor([[-1.0, 1.0], [-3.0, 1.0], [1.0, 1.0], [-255.0, 255.0], [-1.0, 2.0]])
    assert integer_bits(odd).tolist() == [1, 2, 1, 8, 3], "2k + 1 needs the bits of k (and 1 at least)"


@pytest.mark.parametrize("bits, width", [(0.5, 1), (1.0, 1), (1.5, 1), (1.9, 2), (2.0, 2), (3.0, 3)])
def test_midrise_channels_store_in_their_levels_bits_and_keep_their_integers_exact(bits, width):
    conv = torch.nn.Conv2d(1, 2, 1)
    attach_quantizers(conv, QuantizationConfig(grid="midrise"))
    conv.weight.data = torch.linspace(-50, 50, 101).repeat(2, 1).view(2, 101, 1, 1)  # every level reached
    conv.weight_quantizer.exponent.data.fill_(1.0)
    conv.weight_quantizer.bits.data.fill_(bits)
    integers, scale = integer_weights(conv)
    assert torch.equal(integers * scale.view(-1, 1, 1, 1), conv.weight_quantizer(conv.weight).detach())
    assert all(len(channel.unique()) == 2**width for channel in integers), "symmetric: 2^width levels"
    assert integer_bits(integers).tolist() == [width] * 2
    snap_bits({"conv": conv})
    assert conv.weight_quantizer.bits.tolist() == [width] * 2, "a live channel stays alive"
    assert torch.equal(integer_weights(conv)[0], integers)


@pytest.mark.parametrize("bits, width", [(1.3, 1), (1.58, 1), (1.6, 2), (2.2, 2), (2.5, 3), (4.0, 4)])
def test_real_valued_bits_store_in_the_width_of_their_rounded_range(bits, width):
    conv = torch.nn.Conv2d(1, 1, 1)
    attach_quantizers(conv)
    conv.weight.data = torch.linspace(-50, 50, 101).view(1, 101, 1, 1)  # integers far past every range: all clamped
    conv.weight_quantizer.exponent.data.fill_(0.0)
    conv.weight_quantizer.bits.data.fill_(bits)
    assert integer_bits(integer_weights(conv)[0]).item() == width


def test_snapping_keeps_every_integer_inside_its_new_range():
    model = BaselineCNN(width=4)
    attach_quantizers(model, QuantizationConfig(init_bits=2.0, init_scale="lsq"))
    layers = quantized_layers(model)
    for m in layers.values():
        m.weight_quantizer.bits.data.uniform_(0.8, 3.0)
    before = {n: integer_weights(m)[0] for n, m in layers.items()}
    ends = {n: torch.exp2(m.weight_quantizer.bits.detach() - 1).round().view(-1, 1, 1, 1) for n, m in layers.items()}
    snap_bits(layers)
    for name, m in layers.items():
        bits = m.weight_quantizer.bits
        assert torch.equal(bits, bits.round()), "whole bits"
        assert torch.equal(bits, integer_bits(before[name])), "as many as the integers needed"
        after = integer_weights(m)[0]
        held = (before[name] > -ends[name]) & (before[name] < ends[name] - 1)  # not clamped at an end of the old range
        assert held.float().mean() > 0.2 and torch.equal(after[held], before[name][held])


def test_fixed_bits_train_only_the_scales(tiny_fmnist, tmp_path, monkeypatch):
    """An experiment's latency weight left on (ResNet-9's, with `compression=fixed_bits`) times nothing: fixed bits
    have no size term to weight."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    module = ImageClassifier(BaselineCNN(width=4), lr=1e-3)
    compression = SelfCompression(gamma=0.0, init_bits=2, init_scale="lsq", learn_bits=False, quantizer_lr=0.01,
                                  latency_weight=0.5)  # fmt: skip
    layers_before = {}

    class Spy(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            layers_before.update({n: m.weight_quantizer.exponent.detach().clone()
                                  for n, m in quantized_layers(pl_module).items()})  # fmt: skip

    pl.Trainer(callbacks=[compression, Spy()], **trainer_kwargs(tmp_path, max_steps=6)).fit(module, tiny_fmnist)
    assert compression.method == "fixed 2-bit (LSQ)"
    for name, m in quantized_layers(module).items():
        assert torch.equal(m.weight_quantizer.bits, torch.full_like(m.weight_quantizer.bits, 2.0)), name
        assert not torch.equal(m.weight_quantizer.exponent, layers_before[name]), f"{name}: the scale is learned"
        assert m.weight_quantizer.bits.requires_grad, "b is trainable again after fit"
    assert compression.last_report.deployable_bits_per_weight <= 2.0
    assert not list((tmp_path / "cache").rglob("*.json")), "no latency table timed"


def test_fixed_bits_refuse_settings_that_would_move_them():
    with pytest.raises(ValueError, match="learn_bits=False is fixed-bit training at init_bits=2.*gamma=0"):
        SelfCompression(gamma=0.1, init_bits=2, learn_bits=False)
    with pytest.raises(ValueError, match="needs a whole init_bits"):
        SelfCompression(gamma=0.0, init_bits=2.5, learn_bits=False)
    with pytest.raises(ValueError, match=r"freeze_bits_at=1.5 must be a fraction of the run in \(0, 1\]"):
        SelfCompression(freeze_bits_at=1.5)
    with pytest.raises(ValueError, match="init_scale='mean' is not one of"):
        SelfCompression(init_scale="mean")


@pytest.mark.slow
def test_whole_bit_phase_exports_exactly_the_reported_deployable_size(tiny_fmnist, tmp_path):
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(BaselineCNN(1, 10, width=8), optimizer="adam", lr=0.003)
    compression = SelfCompression(gamma=0.5, init_bits=3.0, quantizer_lr=0.1, freeze_bits_at=0.5)
    export = CompressedExport(tmp_path / "model.onnx", latency_batches=(1,), latency_runs=1, engine="never")
    moved_while_frozen = []

    class Spy(pl.Callback):
        last: dict[str, torch.Tensor] = {}

        def on_train_batch_end(self, trainer, pl_module, *args):
            now = {n: m.weight_quantizer.bits.detach().clone() for n, m in quantized_layers(pl_module).items()}
            if compression.compressor.bits_frozen and self.last:
                moved_while_frozen.extend(n for n, b in now.items() if b.shape == self.last[n].shape
                                          and not torch.equal(b, self.last[n]))  # fmt: skip
            self.last = now if compression.compressor.bits_frozen else {}

    callbacks = [compression, Spy(), export]
    pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=24)).fit(module, tiny_fmnist)
    report = compression.report()
    assert compression.compressor.bits_frozen and not moved_while_frozen, "b fixed through the whole-bit phase"
    for name, m in quantized_layers(module).items():
        bits = m.weight_quantizer.bits
        assert torch.equal(bits, bits.round()), f"{name}: whole bits"
    # A dead channel's consumers would still store its inputs until the ChannelSurgeon cuts them: here none died.
    assert report.channels_alive == report.channels
    assert report.deployable_bits <= report.bits, "whole b: the integers need at most b bits"
    file_bits = stored_weight_bits(onnx.load(str(tmp_path / "model.onnx")))
    assert file_bits == report.deployable_bits
    assert json.loads((tmp_path / "model.json").read_text())["weight_bits"] == report.deployable_bits


@pytest.mark.slow
def test_a_checkpoint_from_the_whole_bit_phase_resumes_with_its_bits_frozen(tiny_fmnist, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    pl.seed_everything(0, verbose=False)
    first = SelfCompression(gamma=0.5, init_bits=3.0, quantizer_lr=0.1, freeze_bits_at=0.5)
    saver = ModelCheckpoint(tmp_path / "ckpt", save_last=True)
    kwargs = trainer_kwargs(tmp_path, max_steps=8, enable_checkpointing=True)
    pl.Trainer(callbacks=[first, saver], **kwargs).fit(ImageClassifier(BaselineCNN(width=4)), tiny_fmnist)
    assert first.compressor.bits_frozen
    module = ImageClassifier(BaselineCNN(width=4))
    resumed = SelfCompression(gamma=0.5, init_bits=3.0, quantizer_lr=0.1, freeze_bits_at=0.5)
    kwargs = trainer_kwargs(tmp_path, max_steps=16, enable_checkpointing=True)
    restored = []

    class Spy(pl.Callback):
        def on_fit_start(self, trainer, pl_module):  # after the checkpoint's callback state, before any step
            restored.append(resumed.compressor.bits_frozen and not any(
                m.weight_quantizer.bits.requires_grad for m in quantized_layers(pl_module).values()))  # fmt: skip

    trainer = pl.Trainer(callbacks=[resumed, Spy(), ModelCheckpoint(tmp_path / "ckpt2")], **kwargs)
    checkpoint = torch.load(saver.last_model_path, map_location="cpu", weights_only=False)["state_dict"]
    trainer.fit(module, tiny_fmnist, ckpt_path=saver.last_model_path)
    assert restored == [True], "the phase is part of the checkpoint: b frozen from the first resumed step"
    for name, m in quantized_layers(module).items():
        assert torch.equal(m.weight_quantizer.bits, checkpoint[f"{name}.weight_quantizer.bits"]), f"{name}: b stayed"
        assert not torch.equal(m.weight, checkpoint[f"{name}.weight"]), f"{name}: the weights trained on"


@pytest.mark.parametrize("budget, frozen_at", [(None, 12), (1.0, 18)])
def test_a_run_over_its_budget_waits_for_it_before_the_whole_bit_phase(budget, frozen_at, tiny_fmnist, tmp_path):
    """24 steps, the phase from step 12; 3 bits cannot fall to 1 with a size term this weak, so with a budget of 1
    the freeze waits, up to half the phase (step 18), then comes anyway."""
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(BaselineCNN(1, 10, width=4), optimizer="adam", lr=0.003)
    compression = SelfCompression(gamma=1e-6, init_bits=3.0, quantizer_lr=0.01, freeze_bits_at=0.5,
                                  target_bits_per_weight=budget)  # fmt: skip
    steps = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if compression.compressor.bits_frozen and not steps:
                steps.append(trainer.global_step - 1)  # the step whose batch start froze the bits

    pl.Trainer(callbacks=[compression, Spy()], **trainer_kwargs(tmp_path, max_steps=24)).fit(module, tiny_fmnist)
    assert steps == [frozen_at]
    assert compression.report().deployable_bits_per_weight > 2.5, "the budget was out of reach"
