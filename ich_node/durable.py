"""Durable files: what "on disk" means everywhere in the node.

A file is durable when its bytes were written to a temporary name, fsync'ed,
renamed over the final name, and the folder holding it was fsync'ed (so the
rename itself survives a power cut). The spool, the worker's results and the
offline outputs all go through these two functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write ``path`` durably: readers see the old file or the whole new one, never a part.

    Parameters
    ----------
    path
        The final file name (its folder must exist).
    data
        The bytes, or a function that writes them to the open binary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
