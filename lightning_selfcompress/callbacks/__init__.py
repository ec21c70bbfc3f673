"""Thin Lightning adapters over the core."""

from .selfcompression import SelfCompression
from .sparsity import Sparsity24
from .surgeon import ChannelSurgeon

__all__ = ["ChannelSurgeon", "SelfCompression", "Sparsity24"]
