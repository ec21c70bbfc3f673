"""`lsc-pareto`: the accuracy-size Pareto front of a set of `lsc-train` runs, as two CSV files and a plot.

    lsc-pareto outputs/multirun/2026-12-01_10-00-00 outputs/fmnist_baseline_cnn_float [--out PREFIX]
        [--float-accuracy 0.912] [--latency-batch 64]

Every `report.json` under the given folders is one run (a sweep's folder holds `<n>/report.json`, a
single run's folder holds `report.json`). A `PREFIX.csv` that lsc-pareto wrote before may stand beside them: its
rows are runs too, grouped by their `group` column, so that a front measured over several days or machines (runs
whose folders are gone) can be redrawn with new runs. Runs that differ only in their seed form a group: a point of
the plot at the group's mean, with the spread over seeds. Size is the deployable bits per weight (whole bits, what
the exported file needs), since the real-valued bit depths are a training signal, not a size.

`PREFIX.csv`, one row per run:
    run_dir                     the folder of the run's report.json
    method                      "float", "self-compression", "fixed 2-bit (LSQ)", ...
    group                       the group's label: the overrides that tell it from the other groups
    seed                        config.seed (empty when the report has none)
    test_accuracy               fraction in [0, 1]
    bits_per_weight             real-valued bit depths per weight of the float network (32 for float runs)
    deployable_bits_per_weight  whole bits the stored integers need, per weight of the float network (32 for float)
    weights_kept                weights left after pruning and surgery
    float_weights               weights of the float network
    weights_kept_fraction       weights_kept / float_weights
    latency_ms, latency_batch   with --latency-batch: the run's exported file (its report's export.path), median ms per
                                batch in ONNX Runtime on this CPU, default session, timed side by side with the
                                other runs' files (the best of 3 rounds); empty for a run without a file
    on_front                    whether the run's group is on the Pareto front

`PREFIX_groups.csv`, one row per group:
    group, method, n_seeds, seeds ("0 1 2")
    accuracy_mean, accuracy_std (sample std over seeds; 0 for one seed), accuracy_min, accuracy_max
    bits_per_weight_mean, deployable_bits_per_weight_mean, deployable_bits_per_weight_std,
    weights_kept_fraction_mean, latency_ms_mean (empty unless every run of the group was timed)
    on_front                    no other group is at most as large (mean deployable bits per weight) and at least as
                                accurate (mean test accuracy), and strictly one of the two
    run_dirs                    the group's run folders, separated by " "

`PREFIX.png`: accuracy against deployable bits per weight (log axis), against the fraction of weights kept, and
with --latency-batch (or a CSV whose runs were timed) against the latency of the exported file;
groups at their mean with a std error bar and their seeds as faint dots, a marker and colour per method, the float
baseline as a horizontal line with its min-max band, the front as a step line (compressed methods) and rings.

The default PREFIX is `<first folder>/pareto`. Files are written through a temporary file and a rename, after every
input is read: `lsc-pareto recipes/front.csv outputs/new_runs --out recipes/front` redraws a front in place.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .core.atomic import atomic_path

__all__ = ["Group", "Run", "find_reports", "group_runs", "load_csv_runs", "load_run", "main", "mark_front",
           "write_outputs"]

FLOAT = "float"
REQUIRED = ("test_accuracy", "bits_per_weight", "weights_kept", "float_weights", "config")
CSV_COLUMNS = ("run_dir", "method", "group", "seed", "test_accuracy", "bits_per_weight", "deployable_bits_per_weight",
               "weights_kept", "float_weights")  # fmt: skip
# Config keys that say where or when a run wrote its files, or which seed it drew, and not what it trained: runs that
# differ only in these are the same experiment. A teacher's checkpoint (distill.teacher) is each seed's own float run.
IGNORED_KEYS = {"seed", "report_path", "name", "init_from", "ckpt_path", "teacher"}
PATH_LIKE_KEY = re.compile(r"(path|dir|file|root)$", re.IGNORECASE)
TIME_LIKE = re.compile(r"\d{4}-\d{2}-\d{2}[_T ]?\d{2}[-:]\d{2}")


@dataclass(frozen=True)
class Run:
    """One report.json, reduced to what the front needs."""

    run_dir: Path
    method: str
    seed: int | None
    test_accuracy: float
    bits_per_weight: float
    deployable_bits_per_weight: float
    weights_kept: int
    float_weights: int
    settings: dict[str, Any]  # the flattened config without seeds, paths and times: equal within a group
    overrides: list[str] | None  # .hydra/overrides.yaml without seed and paths, when the run has one
    onnx_path: Path | None = None  # the file the run exported, where its report names one
    latency_ms: float | None = None  # that file's median ms per batch of `latency_batch` (measure_latency)
    latency_batch: int | None = None

    @property
    def weights_kept_fraction(self) -> float:
        return self.weights_kept / self.float_weights if self.float_weights else 0.0


@dataclass
class Group:
    """Runs of one method and one configuration, differing only in their seed."""

    method: str
    runs: list[Run]
    label: str = ""
    on_front: bool = False

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    def values(self, name: str) -> list[float]:
        return [getattr(r, name) for r in self.runs]

    def mean(self, name: str) -> float:
        return statistics.fmean(self.values(name))

    @property
    def timed(self) -> bool:
        return all(r.latency_ms is not None for r in self.runs)

    def std(self, name: str) -> float:
        """The sample standard deviation over seeds; 0 for a single seed."""
        values = self.values(name)
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def accuracy(self) -> float:
        return self.mean("test_accuracy")

    @property
    def size(self) -> float:
        return self.mean("deployable_bits_per_weight")


# ----------------------------------------------------------------------------------------------------- reading


def find_reports(dirs: Sequence[Path]) -> list[Path]:
    """Every report.json under `dirs`, each once, in a stable order. Missing or empty folders are user errors."""
    found: dict[Path, None] = {}
    for directory in dirs:
        if not directory.is_dir():
            raise SystemExit(f"lsc-pareto: {directory} is not a folder: pass the folder of an lsc-train run or sweep "
                             "(or a PREFIX.csv that lsc-pareto wrote).")
        reports = sorted(directory.rglob("report.json"))
        if not reports:
            raise SystemExit(
                f"lsc-pareto: no report.json under {directory}: pass the folder of an lsc-train run (it holds "
                "report.json) or of a sweep (outputs/multirun/<date>/, whose runs each hold one)."
            )
        found.update(dict.fromkeys(p.resolve() for p in reports))
    return list(found)


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values. An empty or null node stays a key, so that
    `compression: null` (float) differs from a compression config."""
    if not isinstance(config, dict) or not config:
        return {prefix: config} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _ignored(key: str, value: Any = None) -> bool:
    """A key that says where, when or with which seed a run ran, not what it trained."""
    last = key.rsplit(".", 1)[-1]
    if key.startswith("hydra.") or last in IGNORED_KEYS or PATH_LIKE_KEY.search(last):
        return True
    return isinstance(value, str) and bool(TIME_LIKE.search(value))


def _read_overrides(run_dir: Path) -> list[str] | None:
    """The run's command-line overrides (Hydra's .hydra/overrides.yaml) that say what it trained."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    import yaml  # Hydra's dependency

    overrides = yaml.safe_load(path.read_text()) or []
    return [o for o in map(str, overrides) if not _ignored(o.split("=", 1)[0].lstrip("+~"))]


def _method(report: dict, config: dict, notes: set[str]) -> str:
    if "method" in report:
        return str(report["method"])
    notes.add("'method' taken from config.compression (reports written before lsc-train recorded it)")
    compression = config.get("compression")
    if not compression:
        return FLOAT
    target = str(compression.get("_target_", "")).rsplit(".", 1)[-1]
    return "self-compression" if target in ("", "SelfCompression") else target


def _deployable(report: dict, notes: set[str]) -> float:
    if "deployable_bits_per_weight" in report:
        return float(report["deployable_bits_per_weight"])
    for bits in ("deployable_bits", "storage_bits"):
        if bits in report and report["float_weights"]:
            notes.add(f"'deployable_bits_per_weight' taken as {bits} / float_weights (older reports)")
            return report[bits] / report["float_weights"]
    notes.add("'deployable_bits_per_weight' taken as bits_per_weight: the report has no whole-bit size (older reports)")
    return float(report["bits_per_weight"])


def load_run(path: Path, notes: set[str]) -> Run:
    """One report.json. Fallbacks for reports older than a key are noted in `notes`, once per kind."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"lsc-pareto: cannot read {path}: {error}") from None
    if not isinstance(report, dict):
        raise SystemExit(f"lsc-pareto: {path} is not an lsc-train report: it holds no JSON object.")
    for key in REQUIRED:
        if key not in report:
            raise SystemExit(f"lsc-pareto: {path} lacks the key {key!r}: it is not a whole lsc-train report.")
    config = report["config"] if isinstance(report["config"], dict) else {}
    try:
        numbers = {key: float(report[key]) for key in REQUIRED if key != "config"}
        deployable = _deployable(report, notes)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"lsc-pareto: {path} holds a size or accuracy that is not a number: {error}") from None
    export = report.get("export")
    onnx_path = export.get("path") if isinstance(export, dict) else None
    return Run(
        run_dir=path.parent,
        method=_method(report, config, notes),
        seed=config.get("seed"),
        test_accuracy=numbers["test_accuracy"],
        bits_per_weight=numbers["bits_per_weight"],
        deployable_bits_per_weight=deployable,
        weights_kept=int(numbers["weights_kept"]),
        float_weights=int(numbers["float_weights"]),
        settings={k: v for k, v in _flatten(config).items() if not _ignored(k, v)},
        overrides=_read_overrides(path.parent),
        onnx_path=Path(onnx_path) if onnx_path else None,
    )


def load_csv_runs(path: Path) -> list[Run]:
    """The runs of a PREFIX.csv that lsc-pareto wrote: a row's group label stands for the settings it ran with."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SystemExit(f"lsc-pareto: cannot read {path}: {error}") from None
    missing = [c for c in CSV_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        why = f"it lacks the columns {', '.join(missing)}" if missing else "it has no rows"
        raise SystemExit(f"lsc-pareto: {path} is not a runs CSV of lsc-pareto (PREFIX.csv, not _groups.csv): {why}.")
    runs = []
    for line, row in enumerate(rows, start=2):
        try:
            runs.append(Run(
                run_dir=Path(row["run_dir"]),
                method=row["method"],
                seed=int(row["seed"]) if row["seed"] else None,
                test_accuracy=float(row["test_accuracy"]),
                bits_per_weight=float(row["bits_per_weight"]),
                deployable_bits_per_weight=float(row["deployable_bits_per_weight"]),
                weights_kept=int(row["weights_kept"]),
                float_weights=int(row["float_weights"]),
                settings={"group": row["group"]},
                overrides=[] if row["group"] == row["method"] else row["group"].split(" "),
                latency_ms=float(row["latency_ms"]) if row.get("latency_ms") else None,
                latency_batch=int(row["latency_batch"]) if row.get("latency_batch") else None,
            ))  # fmt: skip
        except (TypeError, ValueError) as error:
            raise SystemExit(f"lsc-pareto: {path}, line {line}: {error}") from None
    return runs


def measure_latency(runs: Sequence[Run], batch: int, rounds: int = 3, calls: int = 30) -> list[Run]:
    """The runs, each with its exported file's latency at `batch`: every file timed in one process, side by side
    (ONNX Runtime on this CPU, default session, the files taking turns each round), so that the latencies compare.
    Runs without a file on disk (float runs with `export=none`, rows of a CSV) are left untimed, even where a CSV
    held a latency: that one was timed in another process, maybe on another machine."""
    from .core.latency import ort_latency_side_by_side

    files = {i: r.onnx_path for i, r in enumerate(runs) if r.onnx_path is not None and r.onnx_path.is_file()}
    if not files:
        raise SystemExit("lsc-pareto: --latency-batch: none of the runs has its exported file on disk (the report's "
                         "export.path): train with export=onnx, or leave --latency-batch out.")  # fmt: skip
    try:
        best = ort_latency_side_by_side(files, [batch], runs=calls, rounds=rounds)
    except ValueError as error:  # a file whose input shape is not fixed: nothing to time it at
        raise SystemExit(f"lsc-pareto: --latency-batch: {error}") from None
    return [replace(r, latency_ms=best[i][batch] if i in files else None, latency_batch=batch if i in files else None)
            for i, r in enumerate(runs)]  # fmt: skip


# ---------------------------------------------------------------------------------------------- groups, front


def group_runs(runs: Iterable[Run]) -> list[Group]:
    """Runs with the same method and settings form a group; each group gets a label that tells it from the rest."""
    by_key: dict[str, Group] = {}
    for run in runs:
        key = json.dumps([run.method, run.settings], sort_keys=True, default=str)
        by_key.setdefault(key, Group(run.method, [])).runs.append(run)
    groups = list(by_key.values())
    _label(groups)
    return groups


def _label(groups: list[Group]) -> None:
    """A group's label tells it from the other groups of its method (the legend tells the methods apart): its
    overrides less those that all of them share, else its settings that differ between them; else the method."""
    for method in dict.fromkeys(g.method for g in groups):
        same = [g.runs[0] for g in groups if g.method == method]
        given = [set(r.overrides) for r in same if r.overrides is not None]
        shared = set.intersection(*given) if given else set()
        keys = dict.fromkeys(k for r in same for k in r.settings)
        differ = [k for k in keys if len({json.dumps(r.settings.get(k, "<absent>"), default=str) for r in same}) > 1]
        for g, run in zip((g for g in groups if g.method == method), same):
            if run.overrides is not None:
                items = [o for o in run.overrides if o not in shared]
            else:
                items = [f"{k}={run.settings[k]}" for k in differ if k in run.settings]
            g.label = " ".join(items) or method
    seen: dict[str, int] = {}
    for g in groups:  # the same label twice (e.g. the same overrides over an edited config): number them
        seen[g.label] = seen.get(g.label, 0) + 1
        if seen[g.label] > 1:
            g.label += f" #{seen[g.label]}"


def mark_front(groups: list[Group]) -> None:
    """A group is on the front when no other group is at most as large and at least as accurate, one strictly.
    The float baseline takes part too: it leaves the front when a smaller group is at least as accurate."""

    def dominates(o: Group, g: Group) -> bool:
        return o.size <= g.size and o.accuracy >= g.accuracy and (o.size < g.size or o.accuracy > g.accuracy)

    for g in groups:
        g.on_front = not any(dominates(o, g) for o in groups if o is not g)


# ---------------------------------------------------------------------------------------------------- writing


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _run_rows(groups: list[Group]) -> list[dict[str, Any]]:
    rows = []
    for g in groups:
        for r in g.runs:
            rows.append({
                "run_dir": str(r.run_dir),
                "method": r.method,
                "group": g.label,
                "seed": r.seed,
                "test_accuracy": r.test_accuracy,
                "bits_per_weight": r.bits_per_weight,
                "deployable_bits_per_weight": r.deployable_bits_per_weight,
                "weights_kept": r.weights_kept,
                "float_weights": r.float_weights,
                "weights_kept_fraction": r.weights_kept_fraction,
                "latency_ms": r.latency_ms,
                "latency_batch": r.latency_batch,
                "on_front": g.on_front,
            })  # fmt: skip
    return rows


def _group_rows(groups: list[Group]) -> list[dict[str, Any]]:
    rows = []
    for g in groups:
        accuracies = g.values("test_accuracy")
        rows.append({
            "group": g.label,
            "method": g.method,
            "n_seeds": len(g.runs),
            "seeds": " ".join(map(str, g.seeds)),
            "accuracy_mean": g.accuracy,
            "accuracy_std": g.std("test_accuracy"),
            "accuracy_min": min(accuracies),
            "accuracy_max": max(accuracies),
            "bits_per_weight_mean": g.mean("bits_per_weight"),
            "deployable_bits_per_weight_mean": g.size,
            "deployable_bits_per_weight_std": g.std("deployable_bits_per_weight"),
            "weights_kept_fraction_mean": g.mean("weights_kept_fraction"),
            "latency_ms_mean": g.mean("latency_ms") if g.timed else None,
            "on_front": g.on_front,
            "run_dirs": " ".join(str(r.run_dir) for r in g.runs),
        })  # fmt: skip
    return rows


MARKERS = "osD^vP*Xph"


def _float_baselines(groups: list[Group], float_accuracy: float | None) -> list[tuple[str, float, float, float]]:
    """(label, mean, low, high) of each float baseline: the given accuracy, else each float group's seeds."""
    if float_accuracy is not None:
        return [("float (given)", float_accuracy, float_accuracy, float_accuracy)]
    baselines = []
    for g in (g for g in groups if g.method == FLOAT):
        label = FLOAT if g.label == FLOAT else f"float: {g.label}"
        baselines.append((label, g.accuracy, min(g.values("test_accuracy")), max(g.values("test_accuracy"))))
    return baselines


def _plot(path: Path, groups: list[Group], float_accuracy: float | None) -> None:
    # A Figure of its own, not pyplot's: no global backend to switch, nothing to close; PNGs render with Agg.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    methods = sorted({g.method for g in groups}, key=lambda m: (m != FLOAT, m))
    style = {m: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, m in enumerate(methods)}
    panels = [("deployable_bits_per_weight", "deployable bits per weight (log)"),
              ("weights_kept_fraction", "weights kept (fraction of the float network's)")]  # fmt: skip
    timed = [g for g in groups if g.timed]
    if timed:
        batch = timed[0].runs[0].latency_batch
        panels.append(("latency_ms", f"exported file's latency, batch {batch} (ms, ONNX Runtime on this CPU)"))
    fig = Figure(figsize=(6.5 * len(panels), 5.5))
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (x, xlabel) in zip(axes, panels):
        shown = timed if x == "latency_ms" else groups
        for method in methods:
            colour, marker = style[method]
            own = [g for g in shown if g.method == method]
            if not own:
                continue
            seeds = [r for g in own for r in g.runs]
            ax.scatter([getattr(r, x) for r in seeds], [100 * r.test_accuracy for r in seeds], color=colour,
                       marker=marker, alpha=0.25, s=14, linewidths=0)  # fmt: skip
            label = f"{method}: {len(own)} group{'s' * (len(own) > 1)}"
            ax.errorbar([g.mean(x) for g in own], [100 * g.accuracy for g in own],
                        yerr=[100 * g.std("test_accuracy") for g in own], xerr=[g.std(x) for g in own], color=colour,
                        marker=marker, linestyle="none", capsize=3, label=label)  # fmt: skip
        front = [g for g in shown if g.on_front]
        ax.scatter([g.mean(x) for g in front], [100 * g.accuracy for g in front], s=160, facecolors="none",
                   edgecolors="black", linewidths=1.2, label="Pareto front" if x == panels[0][0] else None)  # fmt: skip
        for label, mean, low, high in _float_baselines(groups, float_accuracy):
            ax.axhline(100 * mean, color="grey", linestyle="--", linewidth=1, label=f"{label} {100 * mean:.2f}%")
            if high > low:
                ax.axhspan(100 * low, 100 * high, color="grey", alpha=0.15, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    compressed_front = sorted((g for g in groups if g.on_front and g.method != FLOAT), key=lambda g: g.size)
    if compressed_front:
        axes[0].step([g.size for g in compressed_front], [100 * g.accuracy for g in compressed_front], where="post",
                     color="black", linewidth=1, alpha=0.6)  # fmt: skip
    axes[0].set_xscale("log", base=2)  # sizes from a fraction of a bit to 32: whole bits fall on the ticks
    axes[0].xaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend(fontsize=8, loc="best")
    n_runs = sum(len(g.runs) for g in groups)
    fig.suptitle(f"Accuracy against size: {n_runs} runs in {len(groups)} groups (mean ± std over seeds), "
                 f"{sum(g.on_front for g in groups)} on the Pareto front")  # fmt: skip
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)  # the temporary name has no .png suffix to infer it from


def write_outputs(prefix: Path, groups: list[Group], float_accuracy: float | None = None) -> list[Path]:
    """PREFIX.csv (runs), PREFIX_groups.csv (groups) and PREFIX.png; returns their paths."""
    paths = [prefix.with_name(prefix.name + suffix) for suffix in (".csv", "_groups.csv", ".png")]
    _write_csv(paths[0], _run_rows(groups))
    _write_csv(paths[1], _group_rows(groups))
    _plot(paths[2], groups, float_accuracy)
    return paths


# ----------------------------------------------------------------------------------------------------- command


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lsc-pareto",
        description="The accuracy-size Pareto front of lsc-train runs: finds every report.json under the folders, "
        "groups runs that differ only in their seed, writes PREFIX.csv, PREFIX_groups.csv and PREFIX.png.",
    )
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="folders of lsc-train runs or sweeps (searched recursively), or runs CSVs it wrote before")
    parser.add_argument("--out", type=Path, help="prefix of the files written (default: <first folder>/pareto)")
    parser.add_argument(
        "--float-accuracy", type=float, metavar="X",
        help="the float baseline's test accuracy, 0.912 or 91.2 (default: the runs of method float)",
    )  # fmt: skip
    parser.add_argument(
        "--latency-batch", type=int, metavar="N",
        help="time each run's exported file at this batch size, side by side in ONNX Runtime on this CPU, and plot "
        "accuracy against it (run on an otherwise idle machine)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.latency_batch is not None and args.latency_batch < 1:
        parser.error(f"--latency-batch {args.latency_batch}: a batch size is at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """The console script; user errors leave through SystemExit with a message, no traceback."""
    args = _parse(argv)
    float_accuracy = args.float_accuracy
    if float_accuracy is not None and float_accuracy > 1:
        float_accuracy /= 100  # given in percent
    notes: set[str] = set()
    tables = [p for p in args.dirs if p.suffix == ".csv" and p.is_file()]
    folders = [p for p in args.dirs if p not in tables]
    runs = [run for table in tables for run in load_csv_runs(table)]
    runs += [load_run(path, notes) for path in find_reports(folders)]
    for note in sorted(notes):
        print(f"lsc-pareto: warning: {note}", file=sys.stderr)
    if args.latency_batch:
        runs = measure_latency(runs, args.latency_batch)
    batches = {r.latency_batch for r in runs if r.latency_ms is not None}
    if len(batches) > 1:
        raise SystemExit(f"lsc-pareto: the CSVs' runs were timed at different batch sizes ({sorted(batches)}): pass "
                         "their folders with --latency-batch to time them all side by side.")  # fmt: skip
    groups = group_runs(runs)
    mark_front(groups)
    prefix = args.out or (folders or [tables[0].parent])[0] / "pareto"
    if prefix.is_dir():
        prefix = prefix / "pareto"
    elif prefix.suffix in (".csv", ".png"):
        prefix = prefix.with_suffix("")
    paths = write_outputs(prefix, groups, float_accuracy)
    print(f"{len(runs)} runs in {len(groups)} groups; on the Pareto front (deployable bits per weight, accuracy):")
    for g in sorted((g for g in groups if g.on_front), key=lambda g: g.size):
        latency = f"  {g.mean('latency_ms'):.3f} ms" if g.timed else ""
        print(f"  {g.size:7.3f} bits  {100 * g.accuracy:6.2f}% ± {100 * g.std('test_accuracy'):.2f}{latency}  "
              f"[{g.method}] {g.label} ({len(g.runs)} seed{'s' * (len(g.runs) > 1)})")  # fmt: skip
    print("Wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
