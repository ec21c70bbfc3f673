"""Plots of one run, from the metrics that Lightning's CSVLogger wrote. matplotlib is imported only when a plot is
drawn, so that importing the package stays light."""

from __future__ import annotations

import csv
from pathlib import Path

from .core.atomic import atomic_path

__all__ = ["write_size_plot"]

BITS = "selfcompress/bits_per_weight"
DEPLOYABLE = "selfcompress/deployable_bits_per_weight"
KEPT = "selfcompress/weights_kept"


def _series(metrics_csv: Path, columns: tuple[str, ...]) -> dict[str, tuple[list[float], list[float]]]:
    """(steps, values) of each column that has values. CSVLogger writes one row per logging call, with the columns
    not logged in that call left empty, so each column is read on its own rows."""
    series: dict[str, tuple[list[float], list[float]]] = {c: ([], []) for c in columns}
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            for column in columns:
                value = row.get(column)
                if value not in (None, "") and row.get("step") not in (None, ""):
                    series[column][0].append(float(row["step"]))
                    series[column][1].append(float(value))
    return {c: s for c, s in series.items() if s[0]}


def write_size_plot(metrics_csv: Path, png: Path) -> Path | None:
    """A two-panel PNG of a run's size against its training step: bits per weight (the real-valued training signal
    and the deployable whole bits) and weights kept. Plots the columns that exist; writes nothing and returns None
    when the run logged none of them (a float run)."""
    metrics_csv, png = Path(metrics_csv), Path(png)
    series = _series(metrics_csv, (BITS, DEPLOYABLE, KEPT))
    if not series:
        return None
    # A Figure of its own, not pyplot's: inside a training process (or a notebook) no global backend is switched and
    # nothing is left open; PNGs render with Agg.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    bits_ax, kept_ax = fig.subplots(1, 2)
    for column, label in ((BITS, "real-valued (training signal)"), (DEPLOYABLE, "deployable (whole bits)")):
        if column in series:
            bits_ax.plot(*series[column], label=label)
    bits_ax.set(xlabel="step", ylabel="bits per weight", title="Bits per weight of the float network")
    if KEPT in series:
        kept_ax.plot(*series[KEPT], color="C2")
    else:
        kept_ax.text(0.5, 0.5, "not logged", transform=kept_ax.transAxes, ha="center", color="grey")
    kept_ax.set(xlabel="step", ylabel="weights kept", title="Weights kept")
    for ax in (bits_ax, kept_ax):
        ax.grid(True, alpha=0.3)
    if bits_ax.lines:
        bits_ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)  # the temporary name has no .png suffix to infer it from
    return png
