"""Every config composes and instantiates; the main job runs end to end (tiny) and writes its report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from conftest import requires_fashion_mnist
from lightning_selfcompress import ChannelSurgeon, CompressedExport, SelfCompression, Sparsity24
from lightning_selfcompress.train import CONFIG_DIR, run

GROUPS = {
    group: sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    for group in ("model", "data", "compression", "surgery", "sparsity", "export")
}


def compose_job(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} as in a real run
        with open_dict(cfg):
            del cfg.hydra  # a real run's config has no hydra node either
        return cfg


@pytest.mark.parametrize("model, data, compression, surgery, sparsity, export", list(itertools.product(*GROUPS.values())))
def test_every_config_composes_and_instantiates(model, data, compression, surgery, sparsity, export):
    cfg = compose_job([f"model={model}", f"data={data}", f"compression={compression}", f"surgery={surgery}",
                       f"sparsity={sparsity}", f"export={export}"])  # fmt: skip
    assert instantiate(cfg.model) is not None and instantiate(cfg.data) is not None
    if cfg.compression:
        assert isinstance(instantiate(cfg.compression), SelfCompression)
    if cfg.surgery:
        assert isinstance(instantiate(cfg.surgery), ChannelSurgeon)
    if cfg.sparsity:
        assert isinstance(instantiate(cfg.sparsity), Sparsity24)
    if cfg.export:
        assert isinstance(instantiate(cfg.export), CompressedExport)


TINY = [
    "trainer.max_steps=30", "trainer.val_check_interval=15", "model.width=8", "data.batch_size=64",
    "+data.limit_train=1024", "surgery.every_n_steps=10",
]  # fmt: skip


@pytest.mark.slow
@requires_fashion_mnist
@pytest.mark.parametrize("compression", ["selfcompress", "float"])
def test_main_job_writes_its_report(tmp_path, compression):
    cfg = compose_job([*TINY, f"compression={compression}", f"report_path={tmp_path}/report.json",
                       f"export.path={tmp_path}/model.onnx", "export.latency_runs=3"])  # fmt: skip
    report = run(cfg)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["test_accuracy"] == report["test_accuracy"] and 0.5 < report["test_accuracy"] <= 1.0
    for key in ("bits_per_weight", "size_bytes", "float32_bytes", "weights_kept", "channels_alive", "layers"):
        assert key in on_disk, key
    assert on_disk["train_steps"] == 30 and len(on_disk["layers"]) == 5
    assert on_disk["float32_bytes"] == 4 * on_disk["float_weights"]
    if compression == "float":
        assert on_disk["bits_per_weight"] == 32
    else:
        assert 1 < on_disk["bits_per_weight"] < 8
    assert not list(tmp_path.glob(".report.json.*")), "no temporary file left behind"
    export = on_disk["export"]
    assert (tmp_path / "model.onnx").is_file() and export["parity"]["max_rel"] <= 1e-4
    assert {r["storage"] for r in export["layers"]} == ({"float32"} if compression == "float" else {"int8"})
    surgery = on_disk["surgery"]
    assert surgery["channels_after"] <= surgery["channels_before"] == 8 + 8 + 16 + 16 + 10 and len(surgery["layers"]) == 5


@pytest.mark.slow
@requires_fashion_mnist
def test_the_asp_workflow_prunes_a_dense_checkpoint_and_retrains(tmp_path):
    base = [*(o for o in TINY if not o.startswith("surgery.")), "model=resnet9", "model.width=8", "compression=float",
            "surgery=none"]  # fmt: skip
    dense = run(compose_job([*base, f"report_path={tmp_path}/dense/report.json", "export=none"]))
    assert dense["checkpoint"] and dense["sparsity"] is None
    sparse = run(compose_job([*base, "sparsity=asp", f"init_from='{dense['checkpoint']}'",
                              f"report_path={tmp_path}/asp/report.json", f"export.path={tmp_path}/asp/model.onnx"]))  # fmt: skip
    assert sparse["sparsity"]["pruned"] and "net.prep.0" in sparse["sparsity"]["dense_layers"]
    assert 0.5 < min(sparse["sparsity"]["kept_magnitude"].values()) < 1.0 and sparse["test_accuracy"] > 0.5
    assert set(sparse["export"]["sparse_24_layers"]) == set(sparse["sparsity"]["kept_magnitude"]), "2:4 in the ONNX file too"
    with pytest.raises(FileNotFoundError, match="init_from='missing.ckpt' does not exist"):
        run(compose_job([*base, "init_from=missing.ckpt", f"report_path={tmp_path}/x/report.json"]))
