"""Thin Lightning adapters over the core."""

from .selfcompression import SelfCompression
from .surgeon import ChannelSurgeon

__all__ = ["ChannelSurgeon", "SelfCompression"]
