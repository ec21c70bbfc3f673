"""Thin Lightning adapters over the core."""

from .selfcompression import SelfCompression

__all__ = ["SelfCompression"]
