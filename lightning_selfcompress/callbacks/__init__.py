"""Thin Lightning adapters over the core."""

from .distillation import Distillation
from .export import CompressedExport
from .selfcompression import SelfCompression
from .sparsity import Sparsity24
from .surgeon import ChannelSurgeon

__all__ = ["ChannelSurgeon", "CompressedExport", "Distillation", "SelfCompression", "Sparsity24"]
