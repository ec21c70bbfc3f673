"""The docs build (strict, offline) and the README's Python snippets run as written, on tiny real data."""

from __future__ import annotations

import inspect
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


def _undocumented(obj: object, name: str) -> list[str]:
    """`name` if `obj` has no docstring, and its public methods and properties that have none (an override of a
    documented base method, such as a Lightning hook, counts as documented there)."""
    missing = [] if inspect.getdoc(obj) else [name]
    if inspect.isclass(obj):
        for attr, member in vars(obj).items():
            function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if attr.startswith("_") or not callable(function) or (function.__doc__ or "").strip():
                continue
            if not any((getattr(getattr(base, attr, None), "__doc__", None) or "").strip() for base in obj.__mro__[1:]):
                missing.append(f"{name}.{attr}")
    return missing


def test_every_public_class_function_and_method_has_a_docstring():
    """What the API reference (mkdocstrings) shows: the package's, the core's and the callbacks' exports."""
    import lightning_selfcompress
    import lightning_selfcompress.callbacks
    import lightning_selfcompress.core

    exported = {
        name: getattr(module, name)
        for module in (lightning_selfcompress, lightning_selfcompress.core, lightning_selfcompress.callbacks)
        for name in module.__all__
    }
    missing = [m for name, obj in exported.items() if inspect.isclass(obj) or inspect.isfunction(obj)
               for m in _undocumented(obj, name)]  # fmt: skip
    assert not missing, f"no docstring: {missing}"
