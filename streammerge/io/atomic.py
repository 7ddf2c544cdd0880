"""Durable file operations: write to a temporary name, fsync, rename into place."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputError
from ..names import PARTIAL_SUFFIX


def partial_path(path: Path) -> Path:
    """The temporary name a file is written under until it is complete."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or all of the new one."""
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    fsync_dir(path.parent)
