"""Sparsity24 in real Lightning runs on Fashion-MNIST: one-shot and from-the-start pruning, resume, surgery."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_selfcompress import ChannelSurgeon, SelfCompression, Sparsity24, load_compressed
from lightning_selfcompress.core.sparsity import as_rows, eligible_layers, is_24, mask_1d, masked_layers
from lightning_selfcompress.models import ImageClassifier, ResNet9

from conftest import requires_fashion_mnist, trainer_kwargs
from lightning_selfcompress.data import FashionMNISTDataModule


def module(optimizer: str = "sgd", **kwargs) -> ImageClassifier:
    pl.seed_everything(0, verbose=False)
    net = ResNet9(in_channels=1, num_classes=10, width=8)
    return ImageClassifier(net, optimizer=optimizer, **{"lr": 0.01, **kwargs})


def small_fmnist() -> FashionMNISTDataModule:
    """The real Fashion-MNIST in batches of 8, for runs that only need a few steps (bf16 on CPU is slow)."""
    return FashionMNISTDataModule(batch_size=8, val_size=256, limit_train=256)


def sparse_layers(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in masked_layers(net).items() if not m.weight_mask.all()}


def test_one_shot_pruning_keeps_two_of_four_for_the_rest_of_training(tiny_fmnist, tmp_path):
    net = module()
    sparsity = Sparsity24(start_step=6)
    trainer = pl.Trainer(callbacks=[sparsity], **trainer_kwargs(tmp_path, max_steps=6))
    trainer.fit(net, tiny_fmnist)
    assert not sparsity.sparsifier.pruned and not sparse_layers(net), "dense before start_step"
    assert "net.prep.0" in sparsity.sparsifier.skipped and "1 input channels" in sparsity.sparsifier.skipped["net.prep.0"]
    trainer = pl.Trainer(callbacks=[sparsity], **trainer_kwargs(tmp_path, max_steps=14))
    trainer.fit(net, tiny_fmnist)
    layers = sparse_layers(net)
    assert sparsity.sparsifier.pruned and len(layers) == len(sparsity.sparsifier.layers) == 8
    for name, m in layers.items():
        assert is_24(m.weight), name
    assert 0.5 < min(sparsity.sparsifier.kept_magnitude.values()) < 1.0


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


@pytest.mark.parametrize("recompute", [None, 3])
def test_masks_follow_a_surgery_that_removes_input_channels(tiny_fmnist, tmp_path, recompute):
    net = module("adam")
    sparsity = Sparsity24(0, recompute_every_n_steps=recompute)
    round_to = 4 if recompute else 1  # recompute: widths that stay 2:4, so that some masks live through the cuts
    surgeon = ChannelSurgeon(every_n_steps=4, constant_pull=0.02, round_to=round_to)
    callbacks = [SelfCompression(gamma=2.0, init_bits=2.0, quantizer_lr=0.3), surgeon, sparsity]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=24)).fit(net, tiny_fmnist)
    advice = [w for w in caught if "Set round_to=4" in str(w.message)]
    assert len(advice) == (0 if recompute else 1), "advice where the surgeon's widths may leave 2:4 behind"
    assert callbacks[1].history, "channels were cut"
    assert sparsity.sparsifier.rederived > 0, "some masks lost their groups of 4 and were derived anew"
    for name, m in masked_layers(net).items():
        assert m.weight_mask.shape == m.weight.shape
        assert is_24(m.weight) or m.weight_mask.all(), name
    if recompute:  # the stowed weights were sliced with their layers, and only ever sit where a mask drops
        stowed = {name: m.weight_dropped for name, m in sparsity.sparsifier.layers.items()}
        assert all(v.shape == sparsity.sparsifier.layers[n].weight.shape for n, v in stowed.items())
        assert not any((v * sparsity.sparsifier.layers[n].weight_mask).any() for n, v in stowed.items())
        sparse = [n for n, m in sparsity.sparsifier.layers.items() if not m.weight_mask.all()]
        assert sparse and all(stowed[n].any() for n in sparse), "still there after the cuts"
        assert sparsity.sparsifier.recomputed == 7 and sparsity.sparsifier.masks_changed > 0


class StaleMasks(Callback):
    """Listed after Sparsity24: the masks, not all ones, that are not 2:4 when the first batch of a fit starts."""

    def __init__(self) -> None:
        self.at_first_batch: list[str] | None = None

    def on_train_batch_start(self, trainer, pl_module, *args):
        if self.at_first_batch is None:
            layers = masked_layers(pl_module).items()
            self.at_first_batch = [n for n, m in layers if not m.weight_mask.all() and not is_24(m.weight_mask)]


def test_a_checkpoint_taken_right_after_a_cut_resumes_to_2_4_masks(tiny_fmnist, tmp_path):
    """The surgeon cuts at the end of step 8 and the checkpoint is saved then, before Sparsity24 re-derives the sliced
    masks (at the next step): the resumed run re-derives them before its first step, as the uninterrupted one does."""
    def callbacks(*more: Callback) -> list[Callback]:
        compression = SelfCompression(gamma=2.0, init_bits=2.0, quantizer_lr=0.3)
        return [compression, ChannelSurgeon(every_n_steps=4, constant_pull=0.02), Sparsity24(0), *more]

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    pl.Trainer(callbacks=callbacks(saver), **trainer_kwargs(tmp_path, max_steps=8, enable_checkpointing=True)).fit(
        module("adam"), tiny_fmnist
    )
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    masks = {k: v for k, v in state.items() if k.endswith("weight_mask")}
    assert any(not v.all() and not is_24(v) for v in masks.values()), "the cut left masks off their groups of 4"
    witness = StaleMasks()
    trainer = pl.Trainer(callbacks=callbacks(witness), **trainer_kwargs(tmp_path, max_steps=9))
    trainer.fit(module("adam"), tiny_fmnist, ckpt_path=path)
    assert witness.at_first_batch == []


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly one of start_step"):
        Sparsity24(None)
    with pytest.raises(ValueError, match="calculator='3d'"):
        Sparsity24(0, calculator="3d")
    with pytest.raises(ValueError, match="use calculator='1d' with it"):
        Sparsity24(0, calculator="2d", permute=True)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"recompute_every_n_steps={bad!r} must be a positive integer, or None"):
            Sparsity24(0, recompute_every_n_steps=bad)


def test_start_epoch_prunes_at_the_start_of_that_epoch(tiny_fmnist, tmp_path):
    net, sparsity = module(), Sparsity24(None, start_epoch=1)  # 512 images, batches of 32: 16 steps an epoch
    pl.Trainer(callbacks=[sparsity], **trainer_kwargs(tmp_path, max_steps=16)).fit(net, tiny_fmnist)
    assert not sparsity.sparsifier.pruned and not sparse_layers(net)
    pl.Trainer(callbacks=[sparsity], **trainer_kwargs(tmp_path, max_steps=18)).fit(net, tiny_fmnist)
    assert sparsity.sparsifier.pruned and all(is_24(m.weight) for m in sparse_layers(net).values()) and sparse_layers(net)


def pattern_violations(sparsity: Sparsity24, optimizer: torch.optim.Optimizer) -> list[str]:
    """Eligible layers that are not exactly 2 of every 4, with a zero weight and zero optimizer state where pruned."""
    bad = []
    for name, m in sparsity.sparsifier.layers.items():
        kept = as_rows(m.weight_mask).reshape(-1, 4).sum(1)
        state = optimizer.state.get(m.weight, {}).values()
        tensors = [m.weight, *(v for v in state if torch.is_tensor(v) and v.shape == m.weight.shape)]
        if not ((kept == 2).all() and is_24(m.weight) and all((v[~m.weight_mask] == 0).all() for v in tensors)):
            bad.append(name)
    return bad


class PatternWitness(Callback):
    """Checks the pattern at the first batch after the prune (listed after Sparsity24, so right after it prunes)."""

    def __init__(self, sparsity: Sparsity24) -> None:
        self.sparsity, self.after_prune = sparsity, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.sparsity.sparsifier.pruned and self.after_prune is None:
            self.after_prune = pattern_violations(self.sparsity, trainer.optimizers[0])


# Every pair of (optimizer, precision, accumulation) values is covered: each optimizer with and without bf16 AMP
# and with and without accumulation, each precision with and without accumulation; 6 runs instead of 12.
PAIRWISE = [("sgd", "32-true", 1), ("sgd", "bf16-mixed", 2), ("adam", "32-true", 2), ("adam", "bf16-mixed", 1),
            ("adamw", "32-true", 1), ("adamw", "bf16-mixed", 2)]  # fmt: skip


@requires_fashion_mnist
@pytest.mark.parametrize(("optimizer", "precision", "accumulate"), PAIRWISE)
def test_every_eligible_layer_is_exactly_24_after_the_prune_and_after_training(
    tmp_path, optimizer, precision, accumulate
):
    """One dense optimizer step first (momentum and Adam moments everywhere, as after ASP's dense training), then
    the prune, then 3 sparse steps, with weight decay (SGD: Nesterov momentum 0.9)."""
    net = module(optimizer, weight_decay=0.05)
    sparsity = Sparsity24(start_step=1)
    witness = PatternWitness(sparsity)
    trainer = pl.Trainer(callbacks=[sparsity, witness], **trainer_kwargs(
        tmp_path, max_steps=4, precision=precision, accumulate_grad_batches=accumulate))  # fmt: skip
    trainer.fit(net, small_fmnist())
    assert trainer.global_step == 4 and len(sparsity.sparsifier.layers) == 8
    assert witness.after_prune == [], "right after the prune"
    assert pattern_violations(sparsity, trainer.optimizers[0]) == [], "after 3 more optimizer steps"
    assert all(trainer.optimizers[0].state[m.weight] for m in sparsity.sparsifier.layers.values()), "the optimizer has state"


class RecomputeWitness(Callback):
    """Listed after Sparsity24: when it has just recomputed, the masks must be what magnitude picks from the weights
    as they were after the last step plus the stowed dropped weights, and the new stowed weights what it dropped."""

    def __init__(self, sparsity: Sparsity24) -> None:
        self.sparsity, self.seen, self.checked, self.snapshot, self.restored = sparsity, 0, 0, {}, None

    def on_train_start(self, trainer, pl_module):
        self.restored = {name: m.weight_dropped.clone() for name, m in self.sparsity.sparsifier.layers.items()}
        self.seen = self.sparsity.sparsifier.recomputed

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.snapshot = {n: m.weight.detach() + m.weight_dropped for n, m in self.sparsity.sparsifier.layers.items()}

    def on_train_batch_start(self, trainer, pl_module, *args):
        if self.sparsity.sparsifier.recomputed == self.seen:
            return
        self.seen = self.sparsity.sparsifier.recomputed
        for name, m in self.sparsity.sparsifier.layers.items():
            dense = self.snapshot[name]
            assert torch.equal(m.weight_mask, mask_1d(dense)), name
            assert torch.equal(m.weight, dense * m.weight_mask), name
            assert torch.equal(m.weight_dropped, dense * ~m.weight_mask), name
        self.checked += 1


@requires_fashion_mnist
def test_recompute_rederives_every_mask_from_the_kept_and_the_stowed_weights_and_resumes(tmp_path):
    data, net, sparsity = small_fmnist(), module("adam", lr=0.05), Sparsity24(0, recompute_every_n_steps=2)
    witness = RecomputeWitness(sparsity)
    trainer = pl.Trainer(callbacks=[sparsity, witness], **trainer_kwargs(tmp_path, max_steps=5))
    trainer.fit(net, data)
    assert sparsity.sparsifier.recomputed == witness.checked == 2 and sparsity.sparsifier.masked_at_step == 4, "at steps 2 and 4"
    assert 0 < sparsity.sparsifier.masks_changed < 0.5, "the recompute moved some weights in and out"
    assert pattern_violations(sparsity, trainer.optimizers[0]) == []
    trainer.save_checkpoint(tmp_path / "recompute.ckpt")
    resumed = Sparsity24(0, recompute_every_n_steps=2)
    resumed_witness = RecomputeWitness(resumed)
    pl.Trainer(callbacks=[resumed, resumed_witness], **trainer_kwargs(tmp_path, max_steps=7)).fit(
        module("adam", lr=0.05), data, ckpt_path=tmp_path / "recompute.ckpt"
    )
    stowed = {n: m.weight_dropped for n, m in sparsity.sparsifier.layers.items()}
    assert resumed_witness.restored.keys() == stowed.keys() and any(v.any() for v in stowed.values())
    assert all(torch.equal(resumed_witness.restored[n], v) for n, v in stowed.items()), "from the checkpoint"
    assert resumed.sparsifier.recomputed == 3 and resumed_witness.checked == 1 and resumed.sparsifier.masked_at_step == 6


def test_include_and_exclude_choose_the_layers_that_get_masks(tiny_fmnist, tmp_path):
    net = module()
    sparsity = Sparsity24(0, exclude=["net.layer1.*", "net.linear"])
    pl.Trainer(callbacks=[sparsity], **trainer_kwargs(tmp_path, max_steps=2)).fit(net, tiny_fmnist)
    assert sparsity.sparsifier.skipped["net.linear"] == "left out by include/exclude"
    assert set(sparse_layers(net)) == set(sparsity.sparsifier.layers) and len(sparsity.sparsifier.layers) == 4  # of the 8 above
    assert not any(name.startswith("net.layer1.") or name == "net.linear" for name in sparsity.sparsifier.layers)
    with pytest.raises(TypeError, match=r"exclude='net.linear' must be a list of glob patterns"):
        Sparsity24(0, exclude="net.linear")
    with pytest.raises(ValueError, match=r"exclude pattern 'linear' matches no module .*did you mean \['net.linear'\]"):
        eligible_layers(module(), exclude=["linear"])
