"""Thin Lightning adapters over the core, each imported on first use (CompressedExport also needs ONNX)."""

from typing import TYPE_CHECKING

from ..extras import lazy

if TYPE_CHECKING:
    from .distillation import Distillation
    from .export import CompressedExport
    from .selfcompression import SelfCompression
    from .sparsity import Sparsity24
    from .surgeon import ChannelSurgeon

_MODULES = {
    "ChannelSurgeon": ".surgeon",
    "CompressedExport": ".export",
    "Distillation": ".distillation",
    "SelfCompression": ".selfcompression",
    "Sparsity24": ".sparsity",
}


def __getattr__(name: str):
    return lazy(__name__, _MODULES, name)


__all__ = ["ChannelSurgeon", "CompressedExport", "Distillation", "SelfCompression", "Sparsity24"]
