"""The 2:4 checker on a real ONNX export (ONNX Runtime runs it) and on a checkpoint, and its CLI."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from lightning_selfcompress.check24 import check_path, main
from lightning_selfcompress.core.sparsity import attach_masks


def sparse_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    attach_masks(net)
    return net.eval()


def test_the_checker_reads_an_onnx_export_along_tensorrts_axis(tmp_path):
    net, x = sparse_net(), torch.randn(1, 3, 8, 8)
    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, x, path, dynamo=False)
    session = onnxruntime.InferenceSession(str(path))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    checks = {c.name: c for c in check_path(path)}
    assert {n: c.sparse for n, c in checks.items()} == {"0.weight": False, "2.weight": True, "4.weight": True}
    assert checks["4.weight"].op == "Gemm" and checks["4.weight"].shape == (4, 128)
    assert checks["2.weight"].fraction_zero == 0.5


def test_the_checker_reads_a_checkpoint_and_the_cli_prints_a_table(tmp_path, capsys):
    torch.save({"state_dict": sparse_net().state_dict()}, tmp_path / "net.ckpt")
    assert [c.sparse for c in check_path(tmp_path / "net.ckpt")] == [False, True, True]
    main([str(tmp_path / "net.ckpt")])
    assert "2 of 3 weights are 2:4" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="missing.onnx does not exist"):
        check_path(tmp_path / "missing.onnx")
