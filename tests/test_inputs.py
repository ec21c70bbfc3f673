"""The model input the callbacks trace and export with: found in dict and tuple batches, and errors that say what
was found and what to give instead (real Lightning runs on small real-shaped data)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_selfcompress import ChannelSurgeon, CompressedExport, SelfCompression
from lightning_selfcompress.core.groups import ChannelGraph, GraphError
from lightning_selfcompress.core.inputs import describe, image_batch
from lightning_selfcompress.models import BaselineCNN, ImageClassifier

from conftest import trainer_kwargs


class LabelFirst(Dataset):
    """Items as many datasets give them: a dict with the label before the image."""

    def __init__(self, fmnist) -> None:
        self.images, self.labels = fmnist

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"label": self.labels[i], "image": self.images[i]}


class DictBatches(ImageClassifier):
    def __init__(self, data) -> None:
        super().__init__(BaselineCNN(1, 10, width=4), optimizer="adam", lr=0.003)
        self.data = data

    def train_dataloader(self):
        return DataLoader(LabelFirst(self.data), batch_size=32)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])


class TakesTheDict(DictBatches):
    def forward(self, batch):
        return self.net(batch["image"])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch), batch["label"])


@pytest.fixture
def fmnist_tensors(tiny_fmnist):
    tiny_fmnist.setup("fit")
    return tiny_fmnist.datasets["train"].tensors


def test_batches_are_described_by_type_and_shape():
    batch = {"label": torch.zeros(4, dtype=torch.long), "image": torch.zeros(4, 1, 28, 28)}
    assert describe(batch) == ("a dict with keys ['label', 'image'] ('label': a int64 tensor of shape (4,), "
                               "'image': a float32 tensor of shape (4, 1, 28, 28))")  # fmt: skip
    assert image_batch(batch) is batch["image"] and image_batch((batch["label"], batch["image"])) is batch["image"]
    assert image_batch([batch["label"]]) is None


def test_a_dict_batch_with_its_label_first_is_cut_and_exported(fmnist_tensors, tmp_path):
    pl.seed_everything(0, verbose=False)
    module, surgeon = DictBatches(fmnist_tensors), ChannelSurgeon(every_n_steps=2, constant_pull=0.01)
    export = CompressedExport(tmp_path / "model.onnx", latency_batches=(1,), latency_runs=1, engine="never")
    callbacks = [SelfCompression(gamma=2.0, init_bits=2.0, quantizer_lr=0.3), surgeon, export]
    pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=4)).fit(module)
    assert tuple(surgeon.example_input.shape) == (2, 1, 28, 28), "the image, not the label"
    assert export.report["parity"]["max_rel"] < 1e-3


def test_a_forward_that_takes_the_dict_is_refused_with_what_it_was_given(fmnist_tensors, tmp_path):
    module = TakesTheDict(fmnist_tensors)
    trainer = pl.Trainer(callbacks=[SelfCompression(), ChannelSurgeon(every_n_steps=2)], **trainer_kwargs(tmp_path))
    with pytest.raises(GraphError, match=r"forward fails on the example input \(a float32 tensor of shape "
                                         r"\(2, 1, 28, 28\)\) at node 'getitem'.*unpack it in training_step"):
        trainer.fit(module)


def test_an_example_input_of_the_wrong_kind_is_named(fmnist_tensors, tmp_path):
    module = DictBatches(fmnist_tensors)
    module.example_input_array = {"image": torch.zeros(2, 1, 28, 28)}
    trainer = pl.Trainer(callbacks=[SelfCompression(), ChannelSurgeon(every_n_steps=2)], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"ChannelSurgeon traces forward\(x\) with one tensor .* DictBatches\."
                                         r"example_input_array is a dict with keys \['image'\]"):
        trainer.fit(module)
    with pytest.raises(GraphError, match=r"the example input is a int64 tensor of shape \(4,\)\. Set `example_input"):
        ChannelGraph(BaselineCNN(1, 10, width=4), torch.zeros(4, dtype=torch.long))
