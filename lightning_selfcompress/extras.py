"""The optional parts of the package and the extra that installs each, so a missing one is named with its fix.

The core needs only PyTorch and NumPy. `pip install 'lightning_selfcompress[lightning]'` adds the callbacks,
`[onnx]` the export, `[cli]` (everything) the `lsc-*` commands.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import SelfCompressError

EXTRA_OF = {  # top-level module -> the extra that installs it (pyproject.toml's optional-dependencies)
    "lightning": "lightning",
    "torchmetrics": "lightning",
    "rich": "lightning",
    "typing_extensions": "lightning",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "ml_dtypes": "onnx",
    "hydra": "cli",
    "omegaconf": "cli",
    "yaml": "cli",
    "matplotlib": "cli",
    "torchvision": "cli",
}


class MissingExtraError(SelfCompressError, ModuleNotFoundError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def _missing(what: str, module: str) -> MissingExtraError:
    extra = EXTRA_OF[module]
    return MissingExtraError(
        f"{what} needs {module!r}, which is not installed. "
        f"Install it with: pip install 'lightning_selfcompress[{extra}]'",
        name=module,
    )


def lazy(package: str, where: dict[str, str], name: str) -> Any:
    """`name` from the submodule `where[name]` of `package`, imported now: a module-level `__getattr__`."""
    if name not in where:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    try:
        return getattr(import_module(where[name], package), name)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRA_OF or isinstance(e, MissingExtraError):
            raise
        raise _missing(f"{package}.{name}", top) from e


def require(what: str, *modules: str) -> None:
    """Fail now, naming the extra, if any of `modules` cannot be imported (before the code that imports them)."""
    for module in modules:
        try:
            import_module(module)
        except ModuleNotFoundError as e:
            raise _missing(what, module) from e
