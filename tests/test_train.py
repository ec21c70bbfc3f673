"""Every config composes and instantiates; the main job runs end to end (tiny) and writes its report."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from conftest import requires_fashion_mnist
from lightning_selfcompress import ChannelSurgeon, CompressedExport, SelfCompression, Sparsity24
from lightning_selfcompress.core.parity import ParityError
from lightning_selfcompress.export_cli import find_checkpoint
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


CALLBACK_GROUPS = ("compression", "surgery", "sparsity", "export")
COMBINATIONS = [  # every model with every data set, and every combination of the callbacks' groups
    *({"model": m, "data": d} for m, d in itertools.product(GROUPS["model"], GROUPS["data"])),
    *(dict(zip(CALLBACK_GROUPS, c)) for c in itertools.product(*(GROUPS[g] for g in CALLBACK_GROUPS))),
]


@pytest.mark.parametrize("choice", COMBINATIONS, ids=lambda c: "-".join(c.values()))
def test_every_config_composes_and_instantiates(choice, tmp_path):
    required = [f"data.data_dir={tmp_path}"] if choice.get("data") == "imagenet" else []  # read in setup(), not here
    cfg = compose_job([f"{group}={value}" for group, value in choice.items()] + required)
    assert isinstance(instantiate(cfg.model), torch.nn.Module)
    assert isinstance(instantiate(cfg.data), pl.LightningDataModule)
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
    # 30 steps of a width-8 network: above chance (10%); from 2 bits the compressed one is near 30%
    assert on_disk["test_accuracy"] == report["test_accuracy"] and 0.2 < report["test_accuracy"] <= 1.0
    for key in ("bits_per_weight", "deployable_bits_per_weight", "size_bytes", "float32_bytes", "weights_kept",
                "channels_alive", "layers", "method"):  # fmt: skip
        assert key in on_disk, key
    assert on_disk["method"] == {"float": "float", "selfcompress": "self-compression"}[compression]
    assert on_disk["train_steps"] == 30 and len(on_disk["layers"]) == 5
    assert on_disk["float32_bytes"] == 4 * on_disk["float_weights"]
    if compression == "float":
        assert on_disk["bits_per_weight"] == 32
    else:
        assert 1 < on_disk["bits_per_weight"] < 8 and 0 < on_disk["deployable_bits_per_weight"] < 8
        assert (tmp_path / "size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the size-over-training plot"
    assert not list(tmp_path.glob(".report.json.*")), "no temporary file left behind"
    export = on_disk["export"]
    assert (tmp_path / "model.onnx").is_file() and export["parity"]["max_rel"] <= 1e-4
    assert {r["storage"] for r in export["layers"]} == ({"float32"} if compression == "float" else {"int8"})
    surgery = on_disk["surgery"]
    assert surgery["channels_alive"] <= surgery["channels"] == 8 + 8 + 16 + 16 + 10 and len(surgery["layers"]) == 5


@requires_fashion_mnist
def test_a_run_shorter_than_its_validation_interval_still_leaves_a_checkpoint_named_without_equals(tmp_path):
    report = run(compose_job([*TINY, "trainer.max_steps=4", "trainer.val_check_interval=200", "export=none",
                              f"report_path={tmp_path}/report.json"]))  # fmt: skip
    checkpoints = sorted(p.name for p in (tmp_path / "csv" / "checkpoints").iterdir())
    assert report["checkpoint"] == str(tmp_path / "csv" / "checkpoints" / "last.ckpt") and checkpoints == ["last.ckpt"]
    assert find_checkpoint(str(tmp_path)) == Path(report["checkpoint"]), "lsc-export finds it from the run folder"


@requires_fashion_mnist
def test_a_failed_export_at_the_end_still_leaves_the_tested_report_and_then_raises(tmp_path):
    cfg = compose_job([*TINY, "trainer.max_steps=4", f"report_path={tmp_path}/report.json",
                       f"export.path={tmp_path}/model.onnx", "export.tolerance=1e-12"])  # fmt: skip
    with pytest.raises(ParityError, match="tolerance 1e-12"):
        run(cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert 0 < report["test_accuracy"] <= 1 and report["train_steps"] == 4, "tested and reported"
    assert report["export"]["error"].startswith("ParityError") and not (tmp_path / "model.onnx").exists()
    assert (tmp_path / "csv" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
@requires_fashion_mnist
def test_resuming_a_cut_network_without_a_surgeon_says_so(tmp_path):
    strong = ["compression.gamma=2.0", "compression.target_bits_per_weight=0.3", "compression.quantizer_lr=0.3",
              "surgery.widths=any", "surgery.width_pressure=0", "export=none"]  # fmt: skip
    cut = run(compose_job([*TINY, *strong, f"report_path={tmp_path}/a/report.json"]))
    assert cut["surgery"]["channels_alive"] < cut["surgery"]["channels"], "the network was cut"
    tiny = [o for o in TINY if not o.startswith("surgery.")]
    resume = [*tiny, "export=none", "surgery=none", f"ckpt_path={cut['checkpoint']}"]
    with pytest.raises(ValueError, match=r"holds a network the channel surgeon cut \d+ times.*surgery=channel_surgeon"):
        run(compose_job([*resume, f"report_path={tmp_path}/b/report.json"]))  # before any training
    with pytest.raises(FileNotFoundError, match="ckpt_path='missing.ckpt' does not exist"):
        run(compose_job([*tiny, "ckpt_path=missing.ckpt", f"report_path={tmp_path}/c/report.json"]))


@pytest.mark.slow
@requires_fashion_mnist
def test_a_distilled_job_trains_its_float_teacher_first_or_reads_one(tmp_path):
    base = [*TINY, "trainer.max_steps=10", "export=none", "distill=float_teacher"]
    trained = run(compose_job([*base, "distill.teacher=train", f"report_path={tmp_path}/a/report.json"]))
    assert trained["method"] == "self-compression + distillation" and trained["train_steps"] == 10
    assert (tmp_path / "a" / "teacher" / "hparams.yaml").is_file(), "the float teacher's run logs beside the student's"
    teacher = run(compose_job([*TINY, "trainer.max_steps=10", "trainer.val_check_interval=5", "export=none", "compression=float",
                               f"report_path={tmp_path}/t/report.json"]))  # fmt: skip
    read = run(compose_job([*base, f"distill.teacher='{teacher['checkpoint']}'", f"report_path={tmp_path}/b/report.json"]))
    assert read["method"] == "self-compression + distillation" and not (tmp_path / "b" / "teacher").exists()
    with pytest.raises(ValueError, match="This configuration needs distill.teacher="):
        run(compose_job([*base, f"report_path={tmp_path}/c/report.json"]))
    with pytest.raises(FileNotFoundError, match="distill.teacher='missing.ckpt' does not exist"):
        run(compose_job([*base, "distill.teacher=missing.ckpt", f"report_path={tmp_path}/d/report.json"]))


def test_a_wider_teacher_is_built_as_distill_model_says(tmp_path):
    wide = run(compose_job([*TINY, "trainer.max_steps=2", "model.width=16", "export=none", "compression=float",
                            f"report_path={tmp_path}/t/report.json"]))  # fmt: skip
    teacher = f"distill.teacher='{wide['checkpoint']}'"
    base = [*TINY, "trainer.max_steps=2", "export=none", "distill=float_teacher", teacher]
    read = run(compose_job([*base, "+distill.model.width=16", f"report_path={tmp_path}/s/report.json"]))
    assert read["method"] == "self-compression + distillation"
    hint = r"does not fit model=BaselineCNN as configured; a teacher of another size needs distill.model \(e.g. \+"
    with pytest.raises(ValueError, match=hint):
        run(compose_job([*base, f"report_path={tmp_path}/n/report.json"]))


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
    with pytest.raises(ValueError, match="comes from a compressed or sparse run: start from a dense float one"):
        run(compose_job([*base, f"init_from='{sparse['checkpoint']}'", f"report_path={tmp_path}/y/report.json"]))

    torch.save({"net.unknown": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit model=ResNet9 as configured"):
        run(compose_job([*base, f"init_from={tmp_path}/other.pth", f"report_path={tmp_path}/z/report.json"]))


EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


@requires_fashion_mnist
def test_an_experiments_float_baseline_runs_with_its_compression_options_left_behind(tmp_path):
    """ResNet-9's experiment sets compression.latency_weight; its float baseline turns compression off (the recipe's
    command): those options have no callback to set, which is said, not an error."""
    tiny = (o for o in tiny_experiment("fashion_mnist_resnet9", tmp_path) if not o.startswith("surgery."))
    overrides = [*tiny, "compression=float", "surgery=none"]
    with pytest.warns(UserWarning, match=r"compression: none chosen, so its options \['latency_weight'\]"):
        report = run(compose_job(overrides))
    assert report["method"] == "float" and report["surgery"] is None and report["train_steps"] == 2


def tiny_experiment(name: str, tmp_path: Path) -> list[str]:
    """Overrides that run an experiment for 2 steps on generated data in its real on-disk format, on the CPU."""
    from torchvision.models import resnet50

    from conftest import write_cifar10, write_imagenet

    common = [f"experiment={name}", f"report_path={tmp_path}/run/report.json", "trainer.max_steps=2",
              "trainer.accelerator=cpu", "export=none"]  # fmt: skip  # the export is tested on its own
    if name == "imagenet_resnet50_asp":
        torch.save(resnet50(weights=None, num_classes=4).state_dict(), tmp_path / "dense.pth")  # torchvision's format
        return [*common, f"data.data_dir={write_imagenet(tmp_path / 'imagenet')}", f"init_from={tmp_path}/dense.pth",
                "model.num_classes=4", "data.image_size=32", "data.resize_size=36", "data.batch_size=4",
                "data.num_workers=0", "trainer.max_epochs=1"]  # fmt: skip
    if name == "cifar10_resnet9":
        return [*common, f"data.data_dir={write_cifar10(tmp_path / 'cifar')}", "model.width=8", "data.batch_size=16",
                "data.val_size=20", "trainer.val_check_interval=2", "surgery.every_n_steps=1"]  # fmt: skip
    if name == "fashion_mnist_cnn_distilled":  # the float teacher is trained first, for the same 2 steps
        return [*common, "data.batch_size=16", "+data.limit_train=64", "trainer.val_check_interval=2",
                "surgery.widths=any", "surgery.width_pressure=0"]  # fmt: skip  # latency steps: tested on their own
    if name == "fashion_mnist_resnet9":
        return [*common, "model.width=4", "data.batch_size=16", "+data.limit_train=64", "trainer.val_check_interval=2",
                "surgery.every_n_steps=1"]  # fmt: skip
    raise AssertionError(f"experiment {name} has no tiny overrides here: add them so that it is tested")


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_on_generated_data(name, tmp_path):

    from lightning_selfcompress.core.sparsity import is_24

    cfg = compose_job(tiny_experiment(name, tmp_path))
    report = run(cfg)
    assert report["train_steps"] == 2 and 0.0 <= report["test_accuracy"] <= 1.0
    if name == "imagenet_resnet50_asp":
        assert cfg.optim.optimizer == "sgd" and cfg.optim.lr == 0.1 and cfg.optim.schedule == "step"
        assert cfg.trainer.max_epochs == 1 and cfg.trainer.precision == "bf16-mixed"
        sparsity = report["sparsity"]
        assert sparsity["pruned"] and list(sparsity["dense_layers"]) == ["net.conv1"], "only the 3-channel stem"
        assert len(sparsity["kept_magnitude"]) == 53, "52 convolutions and the classifier are 2:4"
        state = torch.load(report["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
        masked = [k.removesuffix("_mask") for k in state if k.endswith("weight_mask")]
        assert len(masked) == 53 and all(is_24(state[k]) for k in masked), "the checkpoint's weights are 2:4"
    else:
        assert report["surgery"] is not None and 1 < report["bits_per_weight"] < 8
    if name == "fashion_mnist_cnn_distilled":
        assert report["method"] == "self-compression + distillation" and cfg.compression.target_bits_per_weight == 2.0


def test_the_imagenet_recipe_says_what_it_needs(tmp_path):
    from hydra.errors import InstantiationException

    with pytest.raises(ValueError, match="This configuration needs init_from=<the dense ResNet-50 to prune"):
        run(compose_job(["experiment=imagenet_resnet50_asp", f"data.data_dir={tmp_path}"]))
    with pytest.raises(InstantiationException, match="needs data_dir.*data.data_dir=/path/to/imagenet"):
        run(compose_job(["experiment=imagenet_resnet50_asp", "init_from=x.pth"]))


@pytest.mark.slow
def test_an_interrupted_run_continues_from_its_checkpoint_as_if_uninterrupted(tmp_path):
    """80 generated CIFAR-10 training images in batches of 16: 5 steps an epoch. A run of 2 epochs against one of 1
    epoch continued to 2 from its end-of-epoch checkpoint (constant learning rate: a schedule's length would differ)."""

    def job(folder: str, *overrides: str) -> dict:
        tiny = tiny_experiment("cifar10_resnet9", tmp_path / folder)
        every_epoch = ["trainer.max_steps=-1", "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1"]
        # a constant learning rate and no whole-bit phase: both are fractions of the run, whose length differs here
        fixed = ["optim.schedule=constant", "compression.freeze_bits_at=null"]
        return run(compose_job([*tiny, *every_epoch, *fixed, *overrides]))

    whole = job("whole", "+trainer.max_epochs=2")
    first = job("first", "+trainer.max_epochs=1")
    assert first["checkpoint"].endswith("last.ckpt") and (Path(first["checkpoint"]).parent / "epoch0-step5.ckpt").is_file()
    resumed = job("resumed", "+trainer.max_epochs=2", f"ckpt_path={first['checkpoint']}")  # no '=' to quote
    assert whole["train_steps"] == resumed["train_steps"] == 10
    load = lambda report: torch.load(report["checkpoint"], map_location="cpu", weights_only=False)  # noqa: E731
    weights = [load(r)["state_dict"] for r in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.allclose(weights[0][key].float(), weights[1][key].float(), rtol=1e-5, atol=1e-6), key
    assert whole["test_accuracy"] == resumed["test_accuracy"]
    validated = lambda folder: [row["epoch"] for row in csv.DictReader(  # noqa: E731
        (tmp_path / folder / "run" / "csv" / "metrics.csv").open()) if row["val/accuracy"]]  # fmt: skip
    assert validated("whole") == ["0", "1"] and validated("resumed") == ["1"], "the resumed run trained epoch 1 only"
