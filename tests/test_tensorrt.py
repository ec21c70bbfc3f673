"""The TensorRT builder. Where `tensorrt` (or a GPU) is missing, the call's own error is tested and the rest skips."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lightning_selfcompress.core.export import export_onnx
from lightning_selfcompress.core.quant import attach_quantizers
from lightning_selfcompress.core.sparsity import attach_masks
from lightning_selfcompress.core.tensorrt import INSTALL, Engine, EngineBuildError, TensorRTUnavailable, build_engine
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
