"""lsc-export on a real lsc-train run (both as command lines), and its clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import requires_fashion_mnist
from lightning_selfcompress.export_cli import find_checkpoint, find_run_config, run


def _cli(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


@pytest.mark.slow
@requires_fashion_mnist
def test_lsc_export_rebuilds_a_trained_run_and_exports_it_exactly(tmp_path):
    run_dir = tmp_path / "run"
    train = _cli("lightning_selfcompress.train", f"hydra.run.dir={run_dir}", "trainer.max_steps=30",
                 "trainer.val_check_interval=15", "model.width=8", "data.batch_size=64", "+data.limit_train=1024",
                 "surgery.every_n_steps=10", "export=none", cwd=tmp_path)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    out = tmp_path / "exported" / "model.onnx"
    done = _cli("lightning_selfcompress.export_cli", f"checkpoint={run_dir}", f"output={out}", "options.latency_runs=3",
                "options.latency_batches=[1,8]", f"hydra.run.dir={tmp_path}/export", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    trained = json.loads((run_dir / "report.json").read_text())
    assert (
        report["accuracy"]["onnx"] == report["accuracy"]["pytorch"] == pytest.approx(trained["test_accuracy"], abs=1e-6)
    )
    assert report["parity"]["max_rel"] <= 1e-4 and {r["storage"] for r in report["layers"]} == {"int8"}
    channels = {r["name"]: r["channels_alive"] for r in report["layers"]}
    assert channels == {r["name"]: r["channels_alive"] for r in trained["surgery"]["layers"]}
    assert report["file_bytes"] < min(report["float_file_bytes"], report["original_float_file_bytes"])
    assert "TensorRT engine not built" in done.stdout or report["engine"]["built"]


@pytest.mark.slow
@requires_fashion_mnist
def test_steps_trained_for_onnx_runtime_are_exported_for_it_by_both_commands(tmp_path):
    """`compression.activation_runtime=onnxruntime` is the export's runtime too, in lsc-train and lsc-export (a uint8
    step has no TensorRT layout); asked for TensorRT explicitly, lsc-export names the conflict."""
    run_dir = tmp_path / "run"
    train = _cli("lightning_selfcompress.train", f"hydra.run.dir={run_dir}", "trainer.max_steps=12", "model.width=8",
                 "trainer.val_check_interval=12", "data.batch_size=64", "+data.limit_train=1024", "surgery=none",
                 "compression.int8_activations=true", "compression.activation_runtime=onnxruntime",
                 "export.latency_runs=1", "export.latency_batches=[1]", cwd=tmp_path)  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert json.loads((run_dir / "report.json").read_text())["export"]["options"]["runtime"] == "onnxruntime"
    out = tmp_path / "exported" / "model.onnx"
    common = (f"checkpoint={run_dir}", "options.latency_runs=1", "options.latency_batches=[1]", "accuracy=false")
    done = _cli("lightning_selfcompress.export_cli", *common, f"output={out}", f"hydra.run.dir={tmp_path}/e1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.with_suffix(".json").read_text())["options"]["runtime"] == "onnxruntime"
    refused = _cli("lightning_selfcompress.export_cli", *common, f"output={tmp_path}/trt.onnx",
                   "options.runtime=tensorrt", f"hydra.run.dir={tmp_path}/e2", cwd=tmp_path)  # fmt: skip
    assert refused.returncode != 0 and "TensorRT takes symmetric int8 only" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "trt.onnx").exists()


def test_a_missing_checkpoint_or_run_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint='nope.ckpt' does not exist"):
        find_checkpoint("nope.ckpt")
    with pytest.raises(FileNotFoundError, match="is a directory without a .ckpt file"):
        find_checkpoint(str(tmp_path))
    (tmp_path / "a.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="No .hydra/config.yaml above .*Pass run_config="):
        find_run_config(tmp_path / "a.ckpt", None)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}")
    assert find_run_config(find_checkpoint(str(tmp_path)), None) == (tmp_path / ".hydra" / "config.yaml").resolve()


def test_a_wrong_output_or_options_are_refused_before_the_checkpoint_is_read(tmp_path):
    def cfg(output: str, **options):
        options = {"int4": False, "calibrate_batches": 0, "tolerance": 1e-4, "engine": "auto", **options}
        return OmegaConf.create({"checkpoint": "nope.ckpt", "run_config": None, "output": output, "options": options})

    with pytest.raises(ValueError, match="'x.engine' should end in .onnx"):
        run(cfg("x.engine"))
    with pytest.raises(ValueError, match="calibrate_batches=4 with tolerance=0.0001"):
        run(cfg("x.onnx", calibrate_batches=4))
    with pytest.raises(FileNotFoundError, match="checkpoint='nope.ckpt' does not exist"):
        run(cfg("x.onnx"))


@pytest.mark.slow
def test_lsc_export_help_lists_its_own_options_only(tmp_path):
    done = _cli("lightning_selfcompress.export_cli", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("lsc-export: export a trained lsc-train run")
    assert "checkpoint: ???" in done.stdout and "calibrate_batches" in done.stdout
    assert "compression:" not in done.stdout and "surgery:" not in done.stdout, "not the training config groups"
