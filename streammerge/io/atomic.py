"""Durable file operations: write to a temporary name, fsync, rename into place."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

from ..errors import DiskSpaceError, OutputError
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


def write_error(path: Path, error: OSError) -> OutputError:
    """The typed error for a failed write: ``DiskSpaceError`` when the disk is full."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskSpaceError(f"cannot write {str(path)!r}: the disk is full ({error.strerror or error}); free some "
                              "space and re-run the same command: finished shards are kept and the job resumes")
    return OutputError(f"cannot write {str(path)!r}: {error.strerror or error}")


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
        raise write_error(path, e) from e
    fsync_dir(path.parent)


def copy_file_atomic(source: Path, path: Path) -> None:
    """Copy ``source`` to ``path`` durably: to a temporary name, fsync, rename."""
    tmp = partial_path(path)
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (``OSError`` if it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
