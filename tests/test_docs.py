"""The docs build (strict, offline) and the README's Python snippets run as written, on tiny real data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_selfcompress.models import BaselineCNN, ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = [(page, code) for page in ("README.md", "docs/pages/index.md")
            for code in re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)]  # fmt: skip


def test_the_docs_build_strictly_without_a_network(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "docs" / "mkdocs.yml"), "-d",
         str(tmp_path)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "api.html").read_text()
    assert "Sparsifier24" in api and "export_onnx" in api and "SelfCompression" in api, "the reference was generated"


@pytest.mark.parametrize("page, code", SNIPPETS, ids=[f"{p}#{i}" for i, (p, _) in enumerate(SNIPPETS)])
def test_a_documented_snippet_runs_as_written(page, code, tiny_fmnist, tmp_path, monkeypatch):
    """The names a snippet leaves to the reader are given (a small real module, real Fashion-MNIST), and every
    Trainer it builds runs 3 steps in `tmp_path`."""
    real = pl.Trainer

    def short_trainer(*args, **kwargs):
        kwargs.update(max_steps=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=tmp_path, accelerator="cpu", devices=1)  # fmt: skip
        return real(*args, **kwargs)

    monkeypatch.setattr(pl, "Trainer", short_trainer)
    monkeypatch.chdir(tmp_path)
    module = ImageClassifier(BaselineCNN(1, 10, width=8), num_classes=10)
    namespace = {"my_unchanged_lightning_module": module, "datamodule": tiny_fmnist}
    exec(compile(code, f"{page} snippet", "exec"), namespace)  # noqa: S102 - the documented code, as written
    trainer = namespace["trainer"]
    assert trainer.global_step == 3, "the snippet's Trainer trained"
    if "CompressedExport" in code:
        assert (tmp_path / "model.onnx").stat().st_size > 0
