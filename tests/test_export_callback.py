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
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.export_report import ExportOptions, export_and_report
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
    rows = {r["name"]: r for r in report["layers"]}
    assert sum(r["channels_alive"] for r in rows.values()) < sum(r["channels"] for r in rows.values())
    assert {r["storage"] for r in rows.values()} == {"int8"}
    assert {r["ort_kernel"] for r in rows.values()} <= {"float (fused)", "FusedConv", "Conv"}, "weight-only: float"
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


def test_a_run_that_stops_on_an_epochs_last_batch_exports_on_real_batches(tiny_fmnist, tmp_path):
    """Lightning's counter still says every batch of the epoch is done when fit ends: the loader starts over for the
    export rather than yielding nothing (a run with max_epochs had no batch to export with)."""
    module = ImageClassifier(BaselineCNN(1, 10, width=8))
    export = CompressedExport(tmp_path / "model.onnx", latency_batches=(1,), latency_runs=1, engine="never")
    kwargs = trainer_kwargs(tmp_path, max_steps=-1, max_epochs=1)
    trainer = pl.Trainer(callbacks=[SelfCompression(), export], **kwargs)
    trainer.fit(module, tiny_fmnist)
    assert trainer.global_step == len(tiny_fmnist.train_dataloader()), "stopped on the epoch's last batch"
    assert (tmp_path / "model.onnx").is_file() and export.report["parity"]["max_rel"] <= 1e-4


def test_its_own_arguments_are_checked_when_it_is_built(tmp_path):
    for name in ("model.pt", "model.engine", "model.json"):
        with pytest.raises(ValueError, match="should end in .onnx: the engine and the report are written beside it"):
            CompressedExport(tmp_path / name)
    with pytest.raises(ValueError, match="calibrate_batches=2 with tolerance=0.0001: .*Set tolerance=null"):
        CompressedExport(tmp_path / "model.onnx", calibrate_batches=2)
    CompressedExport(tmp_path / "model.onnx", calibrate_batches=2, tolerance=0.05)
    with pytest.raises(
        ValueError, match="int4=True with engine='always': .*TensorRT's INT4 is weight-only and block-wise"
    ):
        CompressedExport(tmp_path / "model.onnx", int4=True, engine="always")
    with pytest.raises(ValueError, match="engine='sometimes' is not one of"):
        CompressedExport(tmp_path / "model.onnx", engine="sometimes")
    with pytest.raises(ValueError, match="runtime='openvino' is not one of \\['tensorrt', 'onnxruntime'\\]"):
        CompressedExport(tmp_path / "model.onnx", runtime="openvino")
    with pytest.raises(ValueError, match="engine='always' with runtime=onnxruntime .* which TensorRT does not take"):
        CompressedExport(tmp_path / "model.onnx", runtime="onnxruntime", engine="always")
    with pytest.raises(ValueError, match="latency_batches=\\[0\\]"):
        CompressedExport(tmp_path / "model.onnx", latency_batches=[0])
    with pytest.raises(ValueError, match="tolerance=0 must be > 0"):
        CompressedExport(tmp_path / "model.onnx", tolerance=0)


def small_quantized_net():
    net = BaselineCNN(1, 10, width=8)
    attach_quantizers(net)
    return net.eval()


@pytest.mark.parametrize("suffix", [".engine", ".json", ""])
def test_an_output_that_is_not_an_onnx_file_is_refused_before_anything_is_written(suffix, tmp_path):
    with pytest.raises(ValueError, match="should end in .onnx"):
        export_and_report(small_quantized_net(), tmp_path / f"model{suffix}", [torch.randn(2, 1, 28, 28)])
    assert list(tmp_path.iterdir()) == []


def test_an_int4_export_is_reported_without_an_engine_and_why(tmp_path):
    options = ExportOptions(int4=True, latency_batches=(1,), latency_runs=1)
    report = export_and_report(small_quantized_net(), tmp_path / "model.onnx", [torch.randn(2, 1, 28, 28)], options)
    on_disk = json.loads((tmp_path / "model.json").read_text())
    assert on_disk["engine"] == report["engine"] == {"built": False, "reason": report["engine"]["reason"]}
    assert "for ONNX Runtime only" in report["engine"]["reason"] and "block-wise" in report["engine"]["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.onnx"]


def test_an_onnx_runtime_layout_is_calibrated_reported_and_gets_no_engine(tmp_path):
    options = ExportOptions(calibrate_batches=2, tolerance=None, runtime="onnxruntime", latency_batches=(1,),
                            latency_runs=1)  # fmt: skip
    batches = [torch.randn(4, 1, 28, 28) for _ in range(2)]
    report = export_and_report(small_quantized_net(), tmp_path / "model.onnx", batches, options)
    assert report["activation_quantized"]
    assert report["engine"] == {"built": False, "reason": report["engine"]["reason"]}
    assert "runtime=onnxruntime" in report["engine"]["reason"] and "runtime=tensorrt" in report["engine"]["reason"]


def test_an_export_path_that_cannot_be_written_is_refused_when_the_callback_is_built(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("kept")
    with pytest.raises(ValueError, match=r"cannot write to '.*a_file' \(.*choose an export path"):
        CompressedExport(blocker / "model.onnx")  # a parent that is a file
    assert blocker.read_text() == "kept", "nothing on disk is touched"
    with pytest.raises(ValueError, match=r"cannot write to '/sys'"):
        CompressedExport("/sys/model.onnx")
    assert CompressedExport(tmp_path / "new" / "folder" / "model.onnx").path.parent.is_dir()
