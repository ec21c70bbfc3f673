"""Writing a file so that no reader ever sees half of it: a temporary file beside it, then a rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import SelfCompressError

__all__ = ["WriteError", "atomic_path"]


class WriteError(SelfCompressError, OSError):
    """A file could not be written (a full disk, a quota, a folder that cannot be written); what was on disk is as
    it was."""


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside `path` (parent directories created) for the block to write; renamed onto `path` when
    the block succeeds, removed when it fails. The file gets the permissions of an ordinary new file (0666 less the
    umask), not mkstemp's 0600, which a rename would keep. An OSError on the way is a `WriteError` naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            message = (
                f"Could not write {str(path)!r}: {error.strerror or error}. Nothing was written there (a file already "
                "there is unchanged); free some space or choose another path."
            )
            # with its errno where it has one: OSError(None, message) would read '[Errno None] ...'
            raise (WriteError(message) if error.errno is None else WriteError(error.errno, message)) from error
        raise
