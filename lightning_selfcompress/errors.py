"""The base of every error the library raises on purpose: `except SelfCompressError` catches them all.

Each also derives from the built-in exception of its kind (ValueError for a bad model or file, RuntimeError for a
failed build, ImportError for a missing dependency), so code that catches those keeps working.
"""

__all__ = ["SelfCompressError"]


class SelfCompressError(Exception):
    """An error lightning_selfcompress raises on purpose, with a message that says what to do."""
