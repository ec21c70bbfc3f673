"""The TensorRT builder. Where `tensorrt` (or a GPU) is missing, the call's own error is tested and the rest skips."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lightning_selfcompress.core.export import export_onnx
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.sparsity import attach_masks
from lightning_selfcompress.core.tensorrt import INSTALL, Engine, EngineBuildError, TensorRTUnavailable, build_engine
from lightning_selfcompress.export_report import ExportOptions, export_and_report
from lightning_selfcompress.models import BaselineCNN

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
requires_tensorrt = pytest.mark.skipif(
    not HAVE_TENSORRT, reason=f"needs TensorRT and a CUDA GPU; install TensorRT with `{INSTALL}`"
)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_without_tensorrt_the_builder_says_how_to_install_it(tmp_path):
    (tmp_path / "net.onnx").write_bytes(b"")
    with pytest.raises(TensorRTUnavailable, match="pip install --extra-index-url https://pypi.nvidia.com tensorrt"):
        build_engine(tmp_path / "net.onnx", tmp_path / "net.engine")
    assert not (tmp_path / "net.engine").exists()


def quantized_net():
    net = BaselineCNN(1, 10, width=8)
    attach_quantizers(net)
    return net.eval()


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT and a GPU are here: the engine is built")
def test_without_an_engine_auto_reports_why_and_always_fails_after_the_onnx_file(tmp_path):
    batches, fast = [torch.randn(2, 1, 28, 28)], {"latency_batches": (1,), "latency_runs": 1}
    report = export_and_report(quantized_net(), tmp_path / "auto.onnx", batches, ExportOptions(**fast))
    assert report["engine"]["built"] is False and report["engine"]["reason"]
    assert json.loads((tmp_path / "auto.json").read_text())["engine"] == report["engine"]
    with pytest.raises(TensorRTUnavailable):
        export_and_report(quantized_net(), tmp_path / "always.onnx", batches, ExportOptions(engine="always", **fast))
    assert (tmp_path / "always.onnx").is_file() and not (tmp_path / "always.json").exists(), "as documented"


@requires_tensorrt
def test_the_engine_covers_every_batch_the_report_runs_through_it(tmp_path):
    batches = [torch.randn(16, 1, 28, 28) for _ in range(2)]  # parity batches larger than the latency batches
    options = ExportOptions(engine="always", latency_batches=(1, 4), latency_runs=3)
    report = export_and_report(quantized_net(), tmp_path / "net.onnx", batches, options)
    assert report["engine"]["built"] and set(report["engine"]["latency_ms"]) == {1, 4}
    with pytest.raises(
        ValueError, match=r"Batch 32 .* outside the engine's profile, \(1, 1, 28, 28\) to \(16, 1, 28, 28\)"
    ):
        Engine(tmp_path / "net.engine")(torch.randn(32, 1, 28, 28))


@requires_tensorrt
def test_engine_from_the_export_matches_pytorch_and_is_timed(tmp_path):
    net = BaselineCNN(1, 10, width=8)
    attach_quantizers(net)
    attach_masks(net)
    net.eval()
    x = torch.randn(8, 1, 28, 28)
    export_onnx(net, x, tmp_path / "net.onnx")
    path = build_engine(tmp_path / "net.onnx", tmp_path / "net.engine", max_batch=8, sparse_weights=True)
    engine = Engine(path)
    expected = net(x).detach()
    got = engine(x.cuda()).cpu()
    torch.cuda.synchronize()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    latency = engine.latency_ms((1, 28, 28), [1, 8], runs=5, warmup=2)
    assert set(latency) == {1, 8} and all(v > 0 for v in latency.values())


@requires_tensorrt
def test_an_engine_build_failure_is_a_clear_error_and_leaves_no_file(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(EngineBuildError, match="could not parse"):
        build_engine(tmp_path / "broken.onnx", tmp_path / "net.engine")
    assert not (tmp_path / "net.engine").exists()
