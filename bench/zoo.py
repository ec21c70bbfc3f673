"""Channel surgery on every torchvision classifier: `python bench/zoo.py [--models resnet18 vgg11 ...] [--out FILE]`.

The survey of `tests/test_zoo.py` (`lightning_selfcompress.testing.survey_torchvision`), written as a table. Per model
(weights=None, 10 classes, float64, a batch of 4 at 32 x 32 or the side it needs; the vision transformers built for
2 x 2 patches of small images): running statistics made non-trivial and then frozen, dropout and stochastic depth off
(their masks are drawn per call), quantizers attached, 30% of the removable channel groups and 30% of each residual
branch's channels killed, then `Surgeon.find()` and `remove()`. Status: `exact` (outputs within 1e-5 relative in train
and eval mode, the history replayed bit for bit on a fresh copy, the cut model's ONNX file within 1e-4 in ONNX
Runtime or torch.onnx unable to export the uncut model either), `refused` (a GraphError naming what the graph cannot
follow), `wrong` or `crashed`. Writes a markdown table (docs/pages/zoo.md by default).
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import asdict
from pathlib import Path

import torchvision

from lightning_selfcompress.testing import ZooRow, survey_torchvision

STATUSES = ("exact", "refused", "wrong", "crashed", "not run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=torchvision.models.list_models(module=torchvision.models))
    parser.add_argument("--out", type=Path, default=Path("docs/pages/zoo.md"))
    parser.add_argument("--max-params", type=float, default=700e6, help="skip larger models (float64: 8 bytes each)")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        rows.append(survey_torchvision(name, args.max_params))
        print(asdict(rows[-1]), flush=True)
        write_table(rows, args.out)  # after every model: a long survey cut short keeps what it found


def write_table(rows: list[ZooRow], out: Path) -> None:
    lines = [
        "| model | M params | status | groups removed | branch channels | after the cut: ONNX | seconds | detail |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | --- |",
    ]
    lines += [
        f"| {r.model} | {r.params / 1e6:.1f} | {r.status} | {r.groups_removed} | {r.branch_channels} | "
        f"{r.export.replace('|', '/')} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |"
        for r in rows
    ]
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = f"{len(rows)} models: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    command = (
        f"Measured with `python bench/zoo.py` on {datetime.date.today()}, one model at a time: the survey of "
        "`tests/test_zoo.py`, whose CI run skips the 17 models past 100 M parameters (`LSC_ZOO_HUGE=1` runs them)."
    )
    out.write_text(summary + "\n\n" + command + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
