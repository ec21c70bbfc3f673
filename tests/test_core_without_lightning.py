"""The core is plain PyTorch: it imports, trains, cuts and exports with Lightning and the CLI's libraries absent."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import requires_fashion_mnist

from lightning_selfcompress.data.fashion_mnist import DEBIAN_DIR, find_idx

ABSENT = (
    "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "hydra", "omegaconf", "rich", "matplotlib"
)  # fmt: skip

# Any import of those fails, as in an environment where they are not installed.
BLOCK = f"""
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
sys.meta_path.insert(0, Absent())
"""


def run_without_lightning(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_blocker_really_blocks_lightning():
    out = run_without_lightning("""
        try:
            import lightning
        except ModuleNotFoundError as e:
            print("blocked:", e)
        import lightning_selfcompress
        try:
            lightning_selfcompress.SelfCompression
        except ModuleNotFoundError as e:
            print("callbacks need it:", e)
    """)
    assert "blocked: No module named 'lightning'" in out and "callbacks need it" in out


@pytest.mark.slow
@requires_fashion_mnist
def test_a_plain_pytorch_loop_compresses_cuts_and_exports_without_lightning(tmp_path):
    images, labels = find_idx(DEBIAN_DIR, "train", "images"), find_idx(DEBIAN_DIR, "train", "labels")
    out = run_without_lightning(f"""
        import torch, torch.nn.functional as F
        from lightning_selfcompress.core import (
            ChannelGraph, SelfCompressor, Surgeon, export_onnx, load_compressed, save_compressed)
        from lightning_selfcompress.data.idx import read_idx
        from lightning_selfcompress.models import BaselineCNN

        torch.manual_seed(0)
        x = (read_idx({str(images)!r})[:512].float().unsqueeze(1) / 255 - 0.286) / 0.353
        y = read_idx({str(labels)!r})[:512].long()
        model = BaselineCNN(width=8)
        compressor = SelfCompressor(gamma=0.5, init_bits=2.0, init_scale="lsq", grid="midrise", freeze_bits_at=0.75,
                                    quantizer_lr=0.05)
        compressor.attach(model, x[:2])
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        compressor.use(optimizer)
        start = compressor.report().bits_per_weight
        for step in range(40):
            batch = slice(step % 4 * 128, step % 4 * 128 + 128)
            compressor.start_step(step, 40)
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            compressor.add_size_gradient(optimizer)
            optimizer.step()
            compressor.end_step()
        compressor.finish()
        whole = [m.weight_quantizer.bits for m in compressor.size.layers.values()]
        print("bits", start, compressor.report().bits_per_weight, compressor.bits_frozen,
              all(bool((b == b.round()).all()) for b in whole))

        model.eval()
        conv = model.features[0]                       # three of its channels reach 0 bits
        with torch.no_grad():
            conv.weight_quantizer.bits[:3] = -1.0
            before = model(x[:64])
        surgeon = Surgeon(ChannelGraph(model, x[:2]))
        record = surgeon.remove(surgeon.find(), [optimizer])
        with torch.no_grad():
            after = model(x[:64])
        print("removed", sum(record.channels.values()), "diff", (after - before).abs().max().item())
        result = export_onnx(model, x[:1], {str(tmp_path / "plain.onnx")!r})
        print("exported", type(result).__name__)

        save_compressed(model, surgeon, {str(tmp_path / "plain.pt")!r})
        fresh = load_compressed(BaselineCNN(width=8), {str(tmp_path / "plain.pt")!r})
        with torch.no_grad():
            print("reloaded", (fresh(x[:64]) - after).abs().max().item())
    """)
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    start, end, frozen, whole = lines["bits"].split()
    assert float(end) < float(start), "the size term lowered the bits per weight"
    assert frozen == whole == "True", "the whole-bit phase set every b to whole bits and froze them"
    removed, diff = lines["removed"].split(" diff ")
    assert int(removed) >= 3 and float(diff) < 1e-5, lines
    assert (tmp_path / "plain.onnx").stat().st_size > 0
    assert float(lines["reloaded"]) == 0.0, "save_compressed/load_compressed rebuild the cut model exactly"


def test_a_missing_extra_is_named_with_the_line_that_installs_it():
    out = run_without_lightning("""
        from lightning_selfcompress.extras import MissingExtraError
        import lightning_selfcompress.data, lightning_selfcompress.models
        from lightning_selfcompress import commands
        for attempt in (
            lambda: lightning_selfcompress.ChannelSurgeon,
            lambda: lightning_selfcompress.models.ImageClassifier,
            lambda: lightning_selfcompress.data.FashionMNISTDataModule,
            commands.train,
            commands.pareto,
        ):
            try:
                attempt()
            except MissingExtraError as e:
                print(e)
    """)
    lines = out.strip().splitlines()
    assert len(lines) == 5, out
    assert "lightning_selfcompress.callbacks.ChannelSurgeon needs 'lightning'" in lines[0]
    assert all("pip install 'lightning_selfcompress[lightning]'" in line for line in lines[:3]), lines
    assert "lsc-train needs 'lightning'" in lines[3] and "lsc-pareto needs 'matplotlib'" in lines[4], lines
    assert "pip install 'lightning_selfcompress[cli]'" in lines[4]


@pytest.mark.slow
def test_without_onnx_the_core_trains_and_the_export_says_which_extra_it_needs():
    block_onnx = BLOCK.replace("'matplotlib')", "'matplotlib', 'onnx', 'onnxruntime')")
    assert block_onnx != BLOCK
    code = """
        import torch
        from lightning_selfcompress.core import SizeModel, attach_quantizers
        from lightning_selfcompress.extras import MissingExtraError
        from lightning_selfcompress.models import BaselineCNN
        model = BaselineCNN(width=4)
        attach_quantizers(model)
        print("bits", SizeModel(model, torch.zeros(2, 1, 28, 28)).bits_per_weight().item())
        try:
            from lightning_selfcompress.core import export_onnx
        except MissingExtraError as e:
            print(e)
    """
    done = subprocess.run([sys.executable, "-c", block_onnx + textwrap.dedent(code)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    bits, message = done.stdout.strip().splitlines()
    assert float(bits.split()[1]) == 8.0
    assert message.startswith("lightning_selfcompress.core.export_onnx needs 'onnx'")
    assert message.endswith("pip install 'lightning_selfcompress[onnx]'")
