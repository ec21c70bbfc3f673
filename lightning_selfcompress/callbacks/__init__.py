"""Thin Lightning adapters over the core."""

from .export import CompressedExport
from .selfcompression import SelfCompression
from .sparsity import Sparsity24
from .surgeon import ChannelSurgeon

__all__ = ["ChannelSurgeon", "CompressedExport", "SelfCompression", "Sparsity24"]
