"""int8 activations on every torchvision classifier: `python bench/int8_zoo.py [--models resnet18 ...] [--out FILE]`.

Per model up to 100 M parameters (weights=None, 10 classes, built as `tests/test_zoo.py`'s survey builds them, zero
weights randomized so that no output is trivially 0), and per runtime layout: quantizers attached with int8 steps for
that runtime (`int8_activations=True, activation_runtime=...`), two SGD steps on random images (64 x 64; 224 for
AlexNet and VGG, whose adaptive pools need it; the survey's sides for the others that need one), then `export_onnx`
in that layout at the default tolerance. The table says whether the file was written and what its parity measured:
the free run's outputs against PyTorch's, the outputs PyTorch computes from the file's codes (what the tolerance
holds), the largest share of one layer's int8 codes that moved, and for ONNX Runtime's layout how many convolutions
its optimized graph runs as integer kernels. Writes a markdown table (docs/pages/int8_zoo.md by default).
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from lightning_selfcompress.core.export import export_onnx
from lightning_selfcompress.core.latency import ort_kernels
from lightning_selfcompress.core.ops import LeafTracer, weights_read_directly
from lightning_selfcompress.core.quant import QuantizationConfig, attach_quantizers
from lightning_selfcompress.testing import IMAGE_SIZE, SIDES, _build, randomize_zero_weights

MAX_PARAMS = 100e6
COLUMNS = ("model", "M params", "layout", "file", "free run", "from the file's codes", "codes moved", "QLinearConv")


def side_of(name: str) -> int:
    if name.startswith(("alexnet", "vgg")):
        return 224
    return IMAGE_SIZE.get(name) or max(SIDES.get(name, 64), 64)


def trained_for(name: str, runtime: str, side: int) -> torch.nn.Module:
    """The model with int8 steps for `runtime`, two plain SGD steps in (the steps start and move)."""
    torch.manual_seed(0)
    net = _build(name)
    randomize_zero_weights(net)
    exclude = weights_read_directly(LeafTracer().trace(net))  # weights read in a function: their layers stay float
    attach_quantizers(net, QuantizationConfig(int8_activations=True, activation_runtime=runtime, exclude=exclude))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(2):
        x, y = torch.randn(4, 3, side, side), torch.randint(0, 10, (4,))
        torch.nn.functional.cross_entropy(net.train()(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return net.eval()


def survey(name: str, runtime: str, scratch: Path) -> list[str]:
    side = side_of(name)
    path = scratch / f"{name}_{runtime}.onnx"
    try:
        result = export_onnx(trained_for(name, runtime, side), torch.randn(2, 3, side, side), path, runtime=runtime)
    except Exception as error:  # noqa: BLE001 - a survey reports every failure and goes on
        return [f"refused: {type(error).__name__}: {str(error)[:200]}", "", "", "", ""]
    parity = result.parity
    convs = [k for layer, k in ort_kernels(path).items() if layer.endswith("Conv")] if runtime == "onnxruntime" else []
    integer = f"{sum(k == 'QLinearConv' for k in convs)} of {len(convs)}" if convs else ""

    def number(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    return [f"written ({side} px)", number(parity.max_rel, ".2g"), number(parity.forced_max_rel, ".2g"),
            number(parity.codes_changed, ".3%"), integer]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=torchvision.models.list_models(module=torchvision.models))
    parser.add_argument("--out", type=Path, default=Path("docs/pages/int8_zoo.md"))
    args = parser.parse_args()
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            params = sum(p.numel() for p in _build(name).parameters())
            if params > MAX_PARAMS:
                skipped.append(name)
                continue
            for runtime in ("onnxruntime", "tensorrt"):
                start = time.perf_counter()
                cells = survey(name, runtime, Path(scratch))
                rows.append([name, f"{params / 1e6:.1f}", runtime, *cells])
                print(*rows[-1], f"{time.perf_counter() - start:.0f} s", sep=" | ", flush=True)
            write_table(rows, skipped, args.out)  # after every model: a survey cut short keeps what it found


def write_table(rows: list[list[str]], skipped: list[str], out: Path) -> None:
    written = sum(row[3].startswith("written") for row in rows)
    summary = (
        f"{written} of {len(rows)} files written ({len(rows) // 2} models, both layouts); past "
        f"{MAX_PARAMS / 1e6:.0f} M parameters, not run: {', '.join(skipped) or 'none'}."
    )
    how = " ".join(__doc__.split("\n\n", 1)[1].split())  # the docstring's paragraph, on one line
    lines = [
        summary,
        "",
        f"Measured with `python bench/int8_zoo.py` on {datetime.date.today()}, one model at a time. {how}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
        *("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
