"""Sparsity24 in real Lightning runs on Fashion-MNIST: one-shot and from-the-start pruning, resume, surgery."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_selfcompress import ChannelSurgeon, SelfCompression, Sparsity24, load_compressed
from lightning_selfcompress.core.sparsity import is_24, masked_layers
from lightning_selfcompress.models import ImageClassifier, ResNet9

from conftest import trainer_kwargs


def module(optimizer: str = "sgd") -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    return ImageClassifier(ResNet9(in_channels=1, num_classes=10, width=8), optimizer=optimizer, lr=0.01)


def sparse_layers(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in masked_layers(net).items() if not m.weight_mask.all()}


def test_one_shot_pruning_keeps_two_of_four_for_the_rest_of_training(tiny_fmnist, tmp_path):
    net = module()
    sparsity = Sparsity24(start_step=6)
    trainer = pl.Trainer(callbacks=[sparsity], **trainer_kwargs(tmp_path, max_steps=6))
    trainer.fit(net, tiny_fmnist)
    assert not sparsity.pruned and not sparse_layers(net), "dense before start_step"
    assert "net.prep.0" in sparsity.skipped and "1 input channels" in sparsity.skipped["net.prep.0"]
    trainer = pl.Trainer(callbacks=[sparsity], **trainer_kwargs(tmp_path, max_steps=14))
    trainer.fit(net, tiny_fmnist)
    layers = sparse_layers(net)
    assert sparsity.pruned and len(layers) == len(sparsity.layers) == 8
    for name, m in layers.items():
        assert is_24(m.weight), name
    assert 0.5 < min(sparsity.kept_magnitude.values()) < 1.0


def test_masks_survive_a_checkpoint_and_load_into_a_fresh_model(tiny_fmnist, tmp_path):
    net = module()
    trainer = pl.Trainer(callbacks=[Sparsity24(0)], **trainer_kwargs(tmp_path, max_steps=4))
    trainer.fit(net, tiny_fmnist)
    trainer.save_checkpoint(tmp_path / "sparse.ckpt")
    resumed_net, resumed = module(), Sparsity24(0)
    pl.Trainer(callbacks=[resumed], **trainer_kwargs(tmp_path, max_steps=8)).fit(
        resumed_net, tiny_fmnist, ckpt_path=tmp_path / "sparse.ckpt"
    )
    for name, m in sparse_layers(net).items():
        fresh = dict(resumed_net.named_modules())[name]
        assert torch.equal(fresh.weight_mask, m.weight_mask), "the masks came back from the checkpoint"
        assert is_24(fresh.weight)
    loaded = load_compressed(module(), tmp_path / "sparse.ckpt")
    assert all(is_24(m.weight) for m in sparse_layers(loaded).values()) and sparse_layers(loaded)


def test_masks_follow_a_surgery_that_removes_input_channels(tiny_fmnist, tmp_path):
    net = module("adam")
    sparsity = Sparsity24(0)
    callbacks = [SelfCompression(gamma=2.0, init_bits=2.0, quantizer_lr=0.3), ChannelSurgeon(every_n_steps=4, constant_pull=0.02), sparsity]
    pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=24)).fit(net, tiny_fmnist)
    assert callbacks[1].history, "channels were cut"
    assert sparsity.rederived > 0, "some masks lost their groups of 4 and were derived anew"
    for name, m in masked_layers(net).items():
        assert m.weight_mask.shape == m.weight.shape
        assert is_24(m.weight) or m.weight_mask.all(), name


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly one of start_step"):
        Sparsity24(None)
    with pytest.raises(ValueError, match="calculator='3d'"):
        Sparsity24(0, calculator="3d")


def test_start_epoch_prunes_at_the_start_of_that_epoch(tiny_fmnist, tmp_path):
    net, sparsity = module(), Sparsity24(None, start_epoch=1)  # 512 images, batches of 32: 16 steps an epoch
    pl.Trainer(callbacks=[sparsity], **trainer_kwargs(tmp_path, max_steps=16)).fit(net, tiny_fmnist)
    assert not sparsity.pruned and not sparse_layers(net)
    pl.Trainer(callbacks=[sparsity], **trainer_kwargs(tmp_path, max_steps=18)).fit(net, tiny_fmnist)
    assert sparsity.pruned and all(is_24(m.weight) for m in sparse_layers(net).values()) and sparse_layers(net)
