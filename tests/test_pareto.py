"""Sweep tooling: the log-uniform sweeper on a real sweep of tiny runs, lsc-pareto on that sweep and on hand-written
reports (groups of seeds, the front, user errors), the run size plot, and the SLURM launcher config."""

from __future__ import annotations

import csv
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import requires_fashion_mnist
from lightning_selfcompress.pareto import find_reports, group_runs, load_run, main, mark_front
from lightning_selfcompress.plots import write_size_plot
from lightning_selfcompress.train import CONFIG_DIR

BIN = Path(sys.executable).parent  # the virtual environment's console scripts
RUN_COLUMNS = ["run_dir", "method", "group", "seed", "test_accuracy", "bits_per_weight", "deployable_bits_per_weight",
               "weights_kept", "float_weights", "weights_kept_fraction", "latency_ms", "latency_batch",
               "on_front"]  # fmt: skip
TINY = {  # 3 steps of a 2-wide network on 64 images; validation and test on one batch
    "trainer.max_steps": 3, "trainer.val_check_interval": 3, "+trainer.limit_val_batches": 1,
    "+trainer.limit_test_batches": 1, "+trainer.enable_progress_bar": "false", "trainer.enable_checkpointing": "false",
    "export": "none", "data.batch_size": 16, "model.width": 2, "+data.limit_train": 64,
}  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def png_shape(path: Path) -> tuple[int, ...]:
    """Reads the file back as an image: fails unless it is a real PNG."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path).shape


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """One real sweep of 3 tiny runs, gamma drawn log-uniformly by hydra/sweeper=gamma_loguniform, in the layout
    lsc-train gives a sweep (<n>/report.json, <n>/.hydra/overrides.yaml)."""
    directory = tmp_path_factory.mktemp("sweep")
    tiny = [f"{k}={v}" for k, v in TINY.items()]
    command = [str(BIN / "lsc-train"), "-m", "hydra/sweeper=gamma_loguniform", "hydra.sweeper.n_trials=3",
               f"hydra.sweep.dir={directory}", *tiny]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return directory


@pytest.mark.slow
@requires_fashion_mnist
def test_the_loguniform_sweeper_runs_distinct_gammas_within_bounds(sweep):
    from hydra.core.override_parser.types import IntervalSweep

    from hydra_plugins.lsc_sweeper.random_sweeper import draw

    reports = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/report.json"))]
    gammas = [r["config"]["compression"]["gamma"] for r in reports]
    assert len(reports) == 3 and len(set(gammas)) == 3 and all(0.01 <= g <= 1.0 for g in gammas), gammas
    assert all(r["config"]["compression"]["target_bits_per_weight"] is None for r in reports), "no budget"
    rng = random.Random(0)
    assert sorted(gammas) == sorted(draw(IntervalSweep(start=0.01, end=1.0, tags={"log"}), rng) for _ in range(3)), (
        "the sweeper's seed 0 draws the same gammas every time"
    )
    folders = sorted(p.parent.name for p in sweep.glob("*/report.json"))
    assert folders == ["0", "1", "2"], "runs in folders by job number"
    overrides = (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
    assert "compression.gamma=" in overrides and "compression.target_bits_per_weight=null" in overrides


@pytest.mark.slow
@requires_fashion_mnist
def test_lsc_pareto_on_a_real_sweep_writes_csvs_and_a_png(sweep, tmp_path):
    done = subprocess.run([str(BIN / "lsc-pareto"), str(sweep), "--out", str(tmp_path / "front")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    runs = read_csv(tmp_path / "front.csv")
    assert list(runs[0]) == RUN_COLUMNS and len(runs) == 3
    assert {r["method"] for r in runs} == {"self-compression"} and all(r["seed"] == "0" for r in runs)
    assert all(r["group"].startswith("compression.gamma=") for r in runs), "labelled by the overrides that differ"
    groups = read_csv(tmp_path / "front_groups.csv")
    assert len(groups) == 3 and all(g["n_seeds"] == "1" for g in groups)
    height, width, _ = png_shape(tmp_path / "front.png")
    assert width > height > 300
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["front.csv", "front.png", "front_groups.csv"], "and no temporary files"
    assert "3 runs in 3 groups" in done.stdout


def test_lsc_pareto_names_what_is_wrong(tmp_path):
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'missing'} is not a folder")):
        main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=re.escape(f"no report.json under {tmp_path / 'empty'}: pass the folder")):
        main([str(tmp_path / "empty")])
    bad = write_report(tmp_path / "bad", "self-compression", 0, 0.9, 2.0)
    report = json.loads(bad.read_text())
    del report["test_accuracy"]
    bad.write_text(json.dumps(report))
    with pytest.raises(SystemExit, match=re.escape(f"{bad} lacks the key 'test_accuracy'")):
        main([str(tmp_path / "bad")])
    bad.write_text(json.dumps(report | {"test_accuracy": None}))
    with pytest.raises(SystemExit, match=re.escape(f"{bad} holds a size or accuracy that is not a number")):
        main([str(tmp_path / "bad")])
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=re.escape(f"cannot read {bad}")):
        main([str(tmp_path / "bad")])
    done = subprocess.run([sys.executable, "-m", "lightning_selfcompress.pareto", str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "no report.json under" in done.stderr and "Traceback" not in done.stderr


def write_report(run_dir: Path, method: str | None, seed: int, accuracy: float, deployable: float, *, gamma=None,
                 overrides: list[str] | None = None, kept: int = 1000, old: bool = False) -> Path:  # fmt: skip
    """A report.json as lsc-train writes it (only the keys lsc-pareto reads, and paths and times that differ per
    run); `old`: without `method` and `deployable_bits_per_weight`, as before they existed."""
    compression = None if method == "float" else {"_target_": "lightning_selfcompress.SelfCompression", "gamma": gamma}
    report = {
        "name": f"fmnist_{method}", "method": method, "test_accuracy": accuracy, "bits_per_weight": deployable - 0.1,
        "deployable_bits_per_weight": deployable, "weights_kept": kept, "float_weights": 1000,
        "config": {
            "seed": seed, "name": f"run_{seed}", "report_path": f"{run_dir}/report.json", "init_from": None,
            "ckpt_path": None, "data": {"seed": seed, "batch_size": 256, "data_dir": f"/data/{seed}"},
            "compression": compression, "export": {"path": f"{run_dir}/model.onnx"},
            "trainer": {"max_steps": 1200}, "started": f"2026-12-0{seed + 1}_10-00-0{seed}",
        },
    }  # fmt: skip
    if old:
        del report["method"], report["deployable_bits_per_weight"]
        report["storage_bits"] = deployable * 1000
    if overrides is not None:
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in [*overrides, f"seed={seed}"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(report))
    return run_dir / "report.json"


def test_seeds_form_groups_and_dominated_groups_are_off_the_front(tmp_path, capsys):
    for seed, accuracy in enumerate((0.91, 0.92, 0.90)):
        write_report(tmp_path / f"float_{seed}", "float", seed, accuracy, 32.0, kept=1000)
    for gamma, points in {0.1: [(0.90, 2.0), (0.88, 2.0)],          # 2 bits, 89%: below LSQ at the same size
                          0.2: [(0.84, 1.5), (0.84, 1.5)],          # 1.5 bits, 84%: 0.3 is smaller and better
                          0.3: [(0.85, 1.0), (0.86, 1.0)]}.items():  # fmt: skip
        for seed, (accuracy, bits) in enumerate(points):
            overrides = [f"compression.gamma={gamma}", "trainer.max_steps=1200"]  # the second is shared by all
            if gamma == 0.3:  # distilled, each seed from its own float run: still one group
                overrides.append(f"distill.teacher=outputs/float_{seed}/last.ckpt")
            write_report(tmp_path / "sweep" / f"{gamma}_{seed}", "self-compression", seed, accuracy, bits, gamma=gamma,
                         overrides=overrides, kept=500)  # fmt: skip
    write_report(tmp_path / "lsq", "fixed 2-bit (LSQ)", 0, 0.908, 2.0)
    write_report(tmp_path / "old", None, 0, 0.80, 0.5, gamma=0.9, old=True)  # no overrides.yaml, older keys

    notes: set[str] = set()
    groups = group_runs(load_run(p, notes) for p in find_reports([tmp_path]))
    mark_front(groups)
    by_label = {g.label: g for g in groups}
    assert len(groups) == 6 and len(notes) == 2, (sorted(by_label), notes)
    floats = by_label["float"]
    assert floats.method == "float" and sorted(floats.seeds) == [0, 1, 2], "seeds, paths and times differ: one group"
    assert floats.accuracy == pytest.approx(0.91) and floats.std("test_accuracy") == pytest.approx(0.01)
    sc = by_label["compression.gamma=0.1"]
    assert sc.accuracy == pytest.approx(0.89) and sc.size == 2.0 and sc.mean("weights_kept_fraction") == 0.5
    old = next(g for g in groups if g.runs[0].run_dir.name == "old")
    assert old.method == "self-compression" and old.size == pytest.approx(0.5), "method and size from older keys"
    front = {g.label for g in groups if g.on_front}
    assert front == {"float", "compression.gamma=0.3", "fixed 2-bit (LSQ)", old.label}

    main([str(tmp_path), "--out", str(tmp_path / "out" / "p"), "--float-accuracy", "91.2"])
    assert "lsc-pareto: warning: 'method' taken from config.compression" in capsys.readouterr().err
    runs = read_csv(tmp_path / "out" / "p.csv")
    assert len(runs) == 3 + 6 + 1 + 1 and list(runs[0]) == RUN_COLUMNS
    rows = {g["group"]: g for g in read_csv(tmp_path / "out" / "p_groups.csv")}
    assert rows["compression.gamma=0.2"]["on_front"] == "False" and rows["compression.gamma=0.3"]["on_front"] == "True"
    assert rows["float"]["n_seeds"] == "3" and rows["float"]["seeds"] == "0 1 2"
    assert float(rows["compression.gamma=0.3"]["accuracy_mean"]) == pytest.approx(0.855)
    assert png_shape(tmp_path / "out" / "p.png")[2] == 4
    main([str(tmp_path / "lsq"), str(tmp_path / "old")])  # the default prefix: the first folder's pareto
    assert (tmp_path / "lsq" / "pareto_groups.csv").is_file() and (tmp_path / "lsq" / "pareto.png").is_file()
    main([str(tmp_path / "lsq"), "--out", str(tmp_path / "out")])  # a folder: its pareto
    assert len(read_csv(tmp_path / "out" / "pareto.csv")) == 1


def test_a_front_is_redrawn_from_its_csv_with_new_runs(tmp_path):
    """Runs whose folders are gone come back from the CSV, in the groups they had; new runs join beside them."""
    for seed, accuracy in enumerate((0.91, 0.93)):
        write_report(tmp_path / "old" / f"float_{seed}", "float", seed, accuracy, 32.0)
        write_report(tmp_path / "old" / f"sc_{seed}", "self-compression", seed, accuracy - 0.02, 1.9,
                     gamma=0.1, overrides=["compression.gamma=0.1"], kept=500)  # fmt: skip
    write_report(tmp_path / "old" / "sc_b", "self-compression", 0, 0.85, 1.0, gamma=0.3,
                 overrides=["compression.gamma=0.3"])
    main([str(tmp_path / "old"), "--out", str(tmp_path / "front")])
    before = {g["group"]: g for g in read_csv(tmp_path / "front_groups.csv")}
    write_report(tmp_path / "new" / "kd", "self-compression + distillation", 0, 0.915, 1.85, overrides=["distill=x"])

    main([str(tmp_path / "front.csv"), str(tmp_path / "new"), "--out", str(tmp_path / "front")])  # in place
    after = {g["group"]: g for g in read_csv(tmp_path / "front_groups.csv")}
    assert set(after) == set(before) | {"self-compression + distillation"}
    for label, group in before.items():
        assert {k: after[label][k] for k in ("n_seeds", "seeds", "accuracy_mean", "accuracy_std")} == {
            k: group[k] for k in ("n_seeds", "seeds", "accuracy_mean", "accuracy_std")}, label
    assert [g["compression.gamma=0.1"]["on_front"] for g in (before, after)] == ["True", "False"]
    assert len(read_csv(tmp_path / "front.csv")) == 6 and png_shape(tmp_path / "front.png")[2] == 4

    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'front_groups.csv'} is not a runs CSV of lsc-pareto")):
        main([str(tmp_path / "front_groups.csv")])
    (tmp_path / "bad.csv").write_text((tmp_path / "front.csv").read_text().replace("0.915", "high", 1))
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'bad.csv'}, line ")):
        main([str(tmp_path / "bad.csv")])


def test_accuracy_is_drawn_against_the_latency_of_each_run_s_exported_file(tmp_path):
    """With --latency-batch, each run's exported file (its report's export.path) is timed in ONNX Runtime, all of them
    in one process; runs without a file stay untimed, and so do a CSV's runs, timed in another process."""
    import torch
    from torch import nn

    from lightning_selfcompress.core.export import export_onnx

    for seed, width in enumerate((4, 8)):
        report = write_report(tmp_path / "runs" / f"sc_{seed}", "self-compression", seed, 0.9, 2.0, gamma=0.1)
        net = nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.Flatten(), nn.Linear(width * 26 * 26, 10))
        path = export_onnx(net, torch.randn(2, 1, 28, 28), report.parent / "model.onnx").path
        report.write_text(json.dumps(json.loads(report.read_text()) | {"export": {"path": str(path)}}))
    write_report(tmp_path / "runs" / "float", "float", 0, 0.91, 32.0)  # export=none: no file

    main([str(tmp_path / "runs"), "--latency-batch", "4", "--out", str(tmp_path / "timed")])
    rows = {Path(r["run_dir"]).name: r for r in read_csv(tmp_path / "timed.csv")}
    assert all(float(rows[name]["latency_ms"]) > 0 and rows[name]["latency_batch"] == "4" for name in ("sc_0", "sc_1"))
    assert rows["float"]["latency_ms"] == rows["float"]["latency_batch"] == "", "no file, no latency"
    groups = {g["method"]: g for g in read_csv(tmp_path / "timed_groups.csv")}
    assert float(groups["self-compression"]["latency_ms_mean"]) > 0 and groups["float"]["latency_ms_mean"] == ""
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "untimed")])
    height, width, _ = png_shape(tmp_path / "timed.png")
    assert width > png_shape(tmp_path / "untimed.png")[1] * 1.3, "a third panel: accuracy against latency"

    main([str(tmp_path / "timed.csv"), "--out", str(tmp_path / "redrawn")])  # a CSV keeps what it held
    assert read_csv(tmp_path / "redrawn.csv") == read_csv(tmp_path / "timed.csv")
    with pytest.raises(SystemExit, match="none of the runs has its exported file on disk"):
        main([str(tmp_path / "timed.csv"), "--latency-batch", "4", "--out", str(tmp_path / "again")])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "runs"), "--latency-batch", "0"])

    import onnx  # a file exported with a free image size: one line naming the file, no traceback

    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    onnx.save(model, str(path))
    with pytest.raises(SystemExit, match=r"lsc-pareto: --latency-batch: .*model.onnx: its input's shape after the"):
        main([str(tmp_path / "runs"), "--latency-batch", "4", "--out", str(tmp_path / "free")])


def test_the_size_plot_draws_what_the_run_logged(tmp_path):
    header = "epoch,step,train/loss,selfcompress/bits_per_weight,selfcompress/deployable_bits_per_weight,"
    rows = [header + "selfcompress/weights_kept,val/accuracy"]
    for step in range(0, 200, 20):  # CSVLogger: one row per logging call, what was not logged left empty
        rows.append(f"0,{step},{1 / (step + 1):.3f},{4 - step / 100},{4 - step // 100},{1000 - step},")
        rows.append(f"0,{step},,,,,0.8")
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    png = write_size_plot(tmp_path / "metrics.csv", tmp_path / "plots" / "size.png")
    height, width, _ = png_shape(png)
    assert png == tmp_path / "plots" / "size.png" and width > height

    only_bits = "step,selfcompress/bits_per_weight\n0,4.0\n10,3.5\n"
    (tmp_path / "bits.csv").write_text(only_bits)
    assert write_size_plot(tmp_path / "bits.csv", tmp_path / "bits.png") == tmp_path / "bits.png"

    (tmp_path / "float.csv").write_text("epoch,step,train/loss\n0,0,2.3\n")  # a float run logs no size
    assert write_size_plot(tmp_path / "float.csv", tmp_path / "float.png") is None
    assert not (tmp_path / "float.png").exists()


def expand(sweeper_args: dict, *overrides: str) -> list[list[list[str]]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.lsc_sweeper.random_sweeper import RandomSweeper

    sweeper = RandomSweeper(**{"n_trials": 3, "seed": 0, "max_batch_size": None, **sweeper_args})
    parsed = OverridesParser.create().parse_overrides([*sweeper._parse_config(), *overrides])
    return sweeper.split_arguments(parsed, sweeper.max_batch_size)


def test_the_random_sweeper_crosses_draws_with_seeds():
    from hydra.errors import HydraException

    params = {"compression.gamma": "tag(log, interval(0.01, 1.0))", "optim.lr": "interval(0.001, 0.002)"}
    (jobs,) = expand({"params": params}, "seed=0,1", "trainer.max_steps=5")
    assert len(jobs) == 3 * 2, "3 trials, each with both seeds"
    trials = [tuple(o for o in job if o.startswith(("compression", "optim"))) for job in jobs]
    assert trials[0] == trials[1] != trials[2] == trials[3], "a trial's seeds sit together and share its draws"
    assert [job[-2:] for job in jobs[:2]] == [["seed=0", "trainer.max_steps=5"], ["seed=1", "trainer.max_steps=5"]]
    for job in jobs:
        values = dict(o.split("=") for o in job)
        assert 0.01 <= float(values["compression.gamma"]) <= 1 and 0.001 <= float(values["optim.lr"]) <= 0.002
    assert expand({"params": params})[0][0] == expand({"params": params})[0][0], "the same seed, the same draws"
    assert expand({"params": params, "seed": 1})[0][0] != expand({"params": params})[0][0]

    (jobs,) = expand({"params": params}, "compression.gamma=0.5")  # the command line wins over params
    assert all("compression.gamma=0.5" in job for job in jobs) and len(jobs) == 3
    assert [len(batch) for batch in expand({"params": params, "max_batch_size": 2}, "seed=0,1")] == [2, 2, 2]
    with pytest.raises(HydraException, match="the low end must be below the high end"):
        expand({}, "compression.gamma=interval(1.0, 0.5)")
    with pytest.raises(HydraException, match="a log interval must be > 0"):
        expand({}, "compression.gamma=tag(log, interval(0, 1))")
    with pytest.raises(HydraException, match="n_trials=0: give at least 1 trial"):
        expand({"n_trials": 0})


def test_the_slurm_launcher_config_composes_where_its_plugin_is_installed():
    import importlib.util

    from hydra.errors import MissingConfigException

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:  # without [slurm]
            with pytest.raises(MissingConfigException, match="Could not load 'hydra/launcher/submitit_slurm'"):
                compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
            return
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.max_num_timeout == 0 and launcher.submitit_folder.endswith("/.submitit/%j")
