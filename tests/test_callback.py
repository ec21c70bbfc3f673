"""SelfCompression inside real Lightning runs on real Fashion-MNIST batches."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from conftest import trainer_kwargs
from lightning_selfcompress import SelfCompression
from lightning_selfcompress.core.quant import quantized_layers
from lightning_selfcompress.models import BaselineCNN, ImageClassifier


def classifier(**kwargs) -> ImageClassifier:
    return ImageClassifier(BaselineCNN(width=4), **kwargs)


def bits_of(module) -> dict[str, torch.Tensor]:
    return {n: m.weight_quantizer.bits.detach().clone() for n, m in quantized_layers(module).items()}


class GradSpy(Callback):
    """Records every b's gradient in on_before_optimizer_step; placed before and after SelfCompression."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(
            [
                torch.zeros_like(m.weight_quantizer.bits, device="cpu") if m.weight_quantizer.bits.grad is None
                else m.weight_quantizer.bits.grad.detach().cpu().clone()
                for m in quantized_layers(pl_module).values()
            ]
        )


def test_quantizers_train_inside_the_users_optimizer(tiny_fmnist, tmp_path):
    module = classifier(lr=1e-3)
    compression = SelfCompression(gamma=0.05, quantizer_lr=0.05)
    trainer = pl.Trainer(callbacks=[compression], **trainer_kwargs(tmp_path, max_steps=6))
    trainer.fit(module, tiny_fmnist)
    assert type(module) is ImageClassifier, "the user's LightningModule class is untouched"
    (optimizer,) = trainer.optimizers
    assert len(optimizer.param_groups) == 1, "the user's param groups are left as built"
    held = {id(p) for p in optimizer.param_groups[0]["params"]}
    after = bits_of(module)
    for name, layer in quantized_layers(module).items():
        assert id(layer.weight_quantizer.bits) in held and id(layer.weight_quantizer.exponent) in held
        assert not torch.equal(after[name], torch.full_like(after[name], 8.0)), f"{name}: b must be trained"
    assert "selfcompress/bits_per_weight" in trainer.callback_metrics
    assert "bits_per_weight" in trainer.progress_bar_metrics, "the size in the progress bar"
    assert compression.compressor.schedule.step == 6
    assert compression.last_report is not None and compression.last_report.bits_per_weight < 8.0, "pulled down"


def size_gradients(tiny_fmnist, tmp_path, **trainer_overrides):
    before, after = GradSpy(), GradSpy()
    compression = SelfCompression(gamma=0.5)
    trainer = pl.Trainer(callbacks=[before, compression, after], **trainer_kwargs(tmp_path, **trainer_overrides))
    trainer.fit(classifier(), tiny_fmnist)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        assert scaler.get_scale() > 1, "fp16 must really scale the loss for this test to mean anything"
    return [[a - b for a, b in zip(post, pre)] for pre, post in zip(before.grads, after.grads)]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(accumulate_grad_batches=2),
        dict(precision="bf16-mixed"),
        pytest.param(  # a moderate initial scale: GradScaler's default overflows and skips the first steps
            dict(plugins=[MixedPrecision("16-mixed", "cuda", torch.amp.GradScaler("cuda", init_scale=1024.0))],
                 accelerator="cuda"),
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="fp16 AMP with a GradScaler needs CUDA; on CPU Lightning uses bf16"
            ),
        ),
    ],
    ids=["accumulate2", "bf16-mixed", "fp16-mixed"],
)
def test_size_gradient_is_added_once_per_optimizer_step_and_unscaled(tiny_fmnist, tmp_path, overrides):
    plain = size_gradients(tiny_fmnist, tmp_path, max_steps=2)
    other = size_gradients(tiny_fmnist, tmp_path, max_steps=2, **overrides)
    assert len(plain) == len(other) == 2, "one size-term gradient per optimizer step"
    for layer_plain, layer_other in zip(plain[0], other[0]):  # identical b at the first step
        torch.testing.assert_close(layer_other, layer_plain, rtol=1e-6, atol=1e-8)  # measured as a difference
        assert layer_plain.abs().sum() > 0


def test_checkpoint_restores_bits_exponents_and_schedule(tiny_fmnist, tmp_path):
    module = classifier()
    compression = SelfCompression(gamma=0.05, gamma_warmup_steps=10, quantizer_lr=0.1)
    trainer = pl.Trainer(callbacks=[compression], **trainer_kwargs(tmp_path, max_steps=5))
    trainer.fit(module, tiny_fmnist)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)

    restored_module, restored = classifier(), SelfCompression(gamma=0.05, gamma_warmup_steps=10)
    resumed = pl.Trainer(callbacks=[restored], **trainer_kwargs(tmp_path, max_steps=5))
    resumed.fit(restored_module, tiny_fmnist, ckpt_path=path)
    assert restored.compressor.schedule.step == compression.compressor.schedule.step == 5, "the warm-up resumes where it was"
    for (name, a), b in zip(quantized_layers(module).items(), quantized_layers(restored_module).values()):
        assert torch.equal(a.weight_quantizer.bits, b.weight_quantizer.bits), name
        assert torch.equal(a.weight_quantizer.exponent, b.weight_quantizer.exponent), name
        assert torch.equal(a.weight, b.weight), name

    longer = pl.Trainer(callbacks=[restored], **trainer_kwargs(tmp_path, max_steps=7))
    longer.fit(restored_module, tiny_fmnist, ckpt_path=path)
    assert restored.compressor.schedule.step == 7


class ZeroGrads(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for p in pl_module.parameters():
            p.grad = torch.zeros_like(p)


def test_quantizers_get_no_weight_decay_unless_asked(tiny_fmnist, tmp_path):
    """gamma=0 and zeroed data gradients: under AdamW's decay only the float weights may move."""
    module = classifier(weight_decay=0.5, lr=0.1)
    weight = module.net.features[0].weight.detach().clone()
    callbacks = [ZeroGrads(), SelfCompression(gamma=0.0)]
    pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=3)).fit(module, tiny_fmnist)
    assert all((b == 8.0).all() for b in bits_of(module).values()), "b started at 8 and must not decay"
    assert module.net.features[0].weight.norm() < 0.99 * weight.norm(), "the float weights do decay"

    decayed = classifier(weight_decay=0.5, lr=0.1)
    callbacks = [ZeroGrads(), SelfCompression(gamma=0.0, quantizer_weight_decay=0.5)]
    pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=3)).fit(decayed, tiny_fmnist)
    assert all((b < 8.0).all() for b in bits_of(decayed).values()), "asked-for decay must shrink b"


class OnlyWeights(ImageClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD([p for n, p in self.named_parameters() if "quantizer" not in n], lr=0.1)


def test_an_optimizer_without_the_quantizers_is_refused(tiny_fmnist, tmp_path):
    trainer = pl.Trainer(callbacks=[SelfCompression()], **trainer_kwargs(tmp_path))
    with pytest.raises(RuntimeError, match=r"No optimizer holds the quantizer parameters \['net.features.0"):
        trainer.fit(OnlyWeights(BaselineCNN(width=4)), tiny_fmnist)


class PoisonBits(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 1:
            pl_module.net.features[6].weight_quantizer.bits.data[0] = float("nan")


def test_non_finite_quantizer_parameters_are_named(tiny_fmnist, tmp_path):
    trainer = pl.Trainer(callbacks=[PoisonBits(), SelfCompression()], **trainer_kwargs(tmp_path))
    with pytest.raises(FloatingPointError, match=r"Non-finite values in \['net.features.6.weight_quantizer.bits'\]"):
        trainer.fit(classifier(), tiny_fmnist)


class PoisonWeight(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 1:
            pl_module.net.features[2].weight.data[0, 0, 0, 0] = float("inf")


def test_a_non_finite_weight_is_named_before_the_quantizer_parameters_it_spoils(tiny_fmnist, tmp_path):
    trainer = pl.Trainer(callbacks=[PoisonWeight(), SelfCompression()], **trainer_kwargs(tmp_path))
    with pytest.raises(FloatingPointError, match=r"Non-finite values in \['net.features.2.weight'\]"):
        trainer.fit(classifier(), tiny_fmnist)


def test_filter_that_selects_nothing_is_named_at_setup(tiny_fmnist, tmp_path):
    trainer = pl.Trainer(callbacks=[SelfCompression(include=["backbone.*"])], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"selects none of the layers \['net.features.0'"):
        trainer.fit(classifier(), tiny_fmnist)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gamma=-1.0), "gamma=-1.0 must be a finite number >= 0"),
        (dict(quantizer_lr=0.0), "quantizer_lr=0.0"),
        (dict(quantizer_weight_decay=float("nan")), "quantizer_weight_decay=nan"),
        (dict(init_bits=float("inf")), "init_bits=inf"),
        (dict(layer_types=["Conv2D"]), "layer_types.*'Conv2D'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelfCompression(**kwargs)


class TwoOptimizers(ImageClassifier):
    """Manual optimization with the features and the classifier in separate optimizers."""

    def __init__(self) -> None:
        super().__init__(BaselineCNN(width=4))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        features, head = self.optimizers()
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        features.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        features.step()
        head.step()

    def configure_optimizers(self):
        return (
            torch.optim.Adam(self.net.features.parameters(), lr=1e-3),
            torch.optim.Adam(self.net.classifier.parameters(), lr=1e-3),
        )


def test_each_optimizer_gets_the_size_gradient_of_its_own_quantizers(tiny_fmnist, tmp_path):
    before, after = GradSpy(), GradSpy()
    module = TwoOptimizers()
    trainer = pl.Trainer(callbacks=[before, SelfCompression(gamma=0.5), after], **trainer_kwargs(tmp_path, max_steps=4))
    trainer.fit(module, tiny_fmnist)
    assert len(after.grads) == 4, "two optimizer steps per batch (Lightning counts max_steps per optimizer step)"
    added = [[a - b for a, b in zip(post, pre)] for pre, post in zip(before.grads, after.grads)]
    features_step, head_step = added[0], added[1]
    assert all(g.abs().sum() > 0 for g in features_step[:4]) and features_step[4].abs().sum() == 0
    assert all(g.abs().sum() == 0 for g in head_step[:4]) and head_step[4].abs().sum() > 0
    assert all((b < 8.0).any() for b in bits_of(module).values())


def test_a_budget_stops_the_size_pull_once_reached(tiny_fmnist, tmp_path):
    before, after = GradSpy(), GradSpy()
    compression = SelfCompression(gamma=0.5, target_bits_per_weight=7.99, quantizer_lr=0.5)
    trainer = pl.Trainer(callbacks=[before, compression, after], **trainer_kwargs(tmp_path, max_steps=4))
    trainer.fit(classifier(), tiny_fmnist)
    added = [sum((a - b).abs().sum() for a, b in zip(post, pre)) for pre, post in zip(before.grads, after.grads)]
    assert added[0] > 0, "at 8 bits per weight the network is above budget: the size term pulls"
    assert added[-1] == 0, "one step at lr 0.5 takes it below 7.99: no more pull"
    assert compression.last_report.bits_per_weight <= 7.99


class OneCycleClassifier(ImageClassifier):
    """A user's module with a warm-up schedule: OneCycleLR starts at max_lr / 25 (its `initial_lr`)."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        steps = self.trainer.max_steps
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.hparams.lr, total_steps=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("max_bits", [8.0, None])
def test_bits_stay_within_max_bits_under_a_warm_up_schedule(max_bits, tiny_fmnist, tmp_path):
    module = OneCycleClassifier(BaselineCNN(width=4), lr=1e-3)
    compression = SelfCompression(gamma=0.0, init_bits=7.9, quantizer_lr=0.5, max_bits=max_bits)
    trainer = pl.Trainer(callbacks=[compression], **trainer_kwargs(tmp_path, max_steps=12))
    trainer.fit(module, tiny_fmnist)
    top = max(float(b.max()) for b in bits_of(module).values())
    if max_bits is not None:
        assert top <= 8.0
    else:
        assert top > 8.5, "without the bound the task gradient lifts b past int8 (the test can fail)"


def test_a_layer_that_falls_back_to_float_in_the_file_is_warned_by_name(tmp_path):
    from lightning_selfcompress.core.export import export_onnx
    from lightning_selfcompress.core.quant import attach_quantizers

    net = BaselineCNN(width=4).eval()
    attach_quantizers(net)
    x = torch.randn(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # 8 bits: every layer int8, no warning
        assert {layer.storage for layer in export_onnx(net, x, tmp_path / "int8.onnx").layers} == {"int8"}
    with torch.no_grad():
        net.features[2].weight_quantizer.bits.fill_(12.0)
        net.features[2].weight_quantizer.exponent.sub_(4.0)  # a 16 times finer step: integers past int8
    with pytest.warns(UserWarning, match=r"1 quantized layer\(s\) stay float32 in the file.*'features.2'.*max_bits"):
        export_onnx(net, x, tmp_path / "float.onnx")


def test_a_bad_max_bits_is_named():
    with pytest.raises(ValueError, match="max_bits=4 must be a number >= init_bits"):
        SelfCompression(init_bits=8, max_bits=4)


def test_the_logits_keep_a_bit_when_the_size_term_kills_every_other_channel(tiny_fmnist, tmp_path):
    """A 0-bit logit is a class lost (a ResNet-9 run lost 4 of 10 classes and fell to 63%): under a size pull that
    kills channels everywhere else, the classifier's every channel stays at 1 bit or more."""
    module = classifier()
    compression = SelfCompression(gamma=5.0, init_bits=2.0, quantizer_lr=0.5)
    pl.Trainer(callbacks=[compression], **trainer_kwargs(tmp_path, max_steps=10)).fit(module, tiny_fmnist)
    bits = bits_of(module)
    assert compression.compressor.size.output_layers == ["net.classifier"]
    assert float(bits.pop("net.classifier").min()) >= 1.0
    assert any(bool((b <= 0).any()) for b in bits.values()), "the pull killed channels elsewhere (the test can fail)"
