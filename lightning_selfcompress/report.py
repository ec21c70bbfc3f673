"""Human-readable and JSON forms of a size report. Files are written atomically."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .core.atomic import atomic_path
from .core.size import LayerShape, SizeReport

__all__ = ["print_size_table", "print_surgery_table", "write_json"]



def make_console() -> Console:
    """rich's console; without a terminal (a log file, CI) 160 columns wide instead of rich's 80, so that the
    tables are not cut."""
    return Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=160)

def print_size_table(report: SizeReport, title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for column in ("layer", "channels alive", "weights kept", "bits", "bits/weight", "deployable bits/weight"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for layer in report.layers:
        table.add_row(
            layer.name,
            *shape_cells(layer),
            f"{layer.bits:,.0f}",
            f"{layer.bits_per_weight:.2f}",
            f"{layer.deployable_bits_per_weight:.2f}",
        )
    table.add_section()
    table.add_row(
        "total",
        f"{report.channels_alive}/{report.channels}",
        f"{report.weights_kept:,}/{report.float_weights:,}",
        f"{report.bits:,.0f}",
        f"{report.bits_per_weight:.2f}",
        f"{report.deployable_bits_per_weight:.2f}",
    )
    console = console or make_console()
    console.print(table)
    console.print(
        f"{report.size_bytes:,} bytes ({report.deployable_bytes:,} deployable: whole bits per channel) vs "
        f"{report.float32_bytes:,} float32 bytes: {report.percent_of_float32:.2f}% of float32 bits"
    )


def print_surgery_table(rows: list[LayerShape], history: list, console: Console | None = None) -> None:
    """Per layer, output channels and weights left of those before the surgeries of this run."""
    table = Table(title=f"Channel surgery: {len(history)} surgeries")
    for column in ("layer", "channels", "weights"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for row in rows:
        table.add_row(row.name, *shape_cells(row))
    table.add_section()
    table.add_row("total", *shape_cells(LayerShape.total(rows)))
    (console or make_console()).print(table)


def shape_cells(row: LayerShape) -> tuple[str, str]:
    """'alive/channels' and 'kept/weights' of one row."""
    return f"{row.channels_alive}/{row.channels}", f"{row.weights_kept:,}/{row.weights:,}"


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write `data` as JSON via a temporary file and a rename, so a reader never sees half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return Path(path)
