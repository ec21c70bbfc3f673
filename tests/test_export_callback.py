"""CompressedExport in a real Lightning run on Fashion-MNIST: self-compression, surgery and 2:4, then the export."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_selfcompress import ChannelSurgeon, CompressedExport, SelfCompression, Sparsity24
from lightning_selfcompress.check24 import check_path
from lightning_selfcompress.core.parity import onnx_session
from lightning_selfcompress.models import BaselineCNN, ImageClassifier

from conftest import trainer_kwargs


@pytest.mark.slow
def test_fit_ends_with_an_exact_export_of_the_thinned_sparse_network(tiny_fmnist, tmp_path):
    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(BaselineCNN(1, 10, width=8), optimizer="adam", lr=0.003)
    export = CompressedExport(tmp_path / "out" / "model.onnx", latency_batches=(1, 4), latency_runs=3)
    callbacks = [
        SelfCompression(gamma=2.0, init_bits=2.0, quantizer_lr=0.3),
        ChannelSurgeon(every_n_steps=8, constant_pull=0.01, round_to=4),
        Sparsity24(start_step=0),
        export,
    ]
    pl.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=24)).fit(module, tiny_fmnist)
    report = json.loads((tmp_path / "out" / "model.json").read_text())
    assert report == json.loads(json.dumps(export.report))
    rows = {r["layer"]: r for r in report["layers"]}
    assert sum(r["channels_after"] for r in rows.values()) < sum(r["channels_before"] for r in rows.values())
    assert {r["storage"] for r in rows.values()} == {"int8"}
    assert report["macs_after"] < report["macs_before"] and report["parameters_after"] < report["parameters_before"]
    assert report["parity"]["max_rel"] <= 1e-4
    assert report["file_bytes"] < report["float_file_bytes"]
    assert set(report["ort_cpu_latency_ms"]) == {"1", "4"}
    assert report["engine"]["built"] is False and "pip install" in report["engine"]["reason"]
    sparse = {
        c.name.removesuffix(".weight_dequantized") for c in check_path(tmp_path / "out" / "model.onnx") if c.sparse
    }
    assert sparse == set(report["sparse_24_layers"]) and sparse, "the 2:4 layers stay 2:4 in the file"
    x, _ = next(iter(tiny_fmnist.test_dataloader()))
    session = onnx_session(tmp_path / "out" / "model.onnx")
    with torch.no_grad():
        np.testing.assert_allclose(
            session.run(None, {"input": x.numpy()})[0], module.eval()(x).numpy(), rtol=1e-4, atol=1e-4
        )


def test_its_own_arguments_are_checked_when_it_is_built(tmp_path):
    with pytest.raises(ValueError, match="should end in .onnx"):
        CompressedExport(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="engine='sometimes' is not one of"):
        CompressedExport(tmp_path / "model.onnx", engine="sometimes")
    with pytest.raises(ValueError, match="latency_batches=\\[0\\]"):
        CompressedExport(tmp_path / "model.onnx", latency_batches=[0])
    with pytest.raises(ValueError, match="tolerance=0 must be > 0"):
        CompressedExport(tmp_path / "model.onnx", tolerance=0)
