"""One writer per output directory: an advisory lock on the directory itself, held for the job.

``flock`` on the directory's own file descriptor: nothing is left in the directory (no lock
file a Hub upload would carry), and the kernel drops the lock when the holder exits in any way,
so a job killed by SIGKILL never blocks its own resume.  A second process that targets a
directory in use stops at once with ``OutputLockedError`` naming the directory and, on Linux,
the holder's pid (from ``/proc/locks``), and never touches the first job's files.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from ..errors import OutputError, OutputLockedError

__all__ = ["OutputLock", "is_locked"]

_PROC_LOCKS = Path("/proc/locks")


def _holder_pid(directory_fd: int) -> int | None:
    """The pid holding a flock on the directory, from /proc/locks (None when it cannot be told)."""
    st = os.fstat(directory_fd)
    try:
        lines = _PROC_LOCKS.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 12345 fd:01:1234567 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK":
            try:
                major, minor, inode = fields[5].split(":")
                if int(inode) == st.st_ino and os.makedev(int(major, 16), int(minor, 16)) == st.st_dev:
                    return int(fields[4])
            except ValueError:
                continue
    return None


def is_locked(out_dir: Path) -> bool:
    """Whether some process holds ``out_dir``'s lock (a shared lock is tried and dropped at once).

    The other ranks of a distributed job ask this before each unit: rank 0 holds the lock for the
    whole job, so a free lock means rank 0 is gone and the rank must stop writing.
    """
    try:
        fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class OutputLock:
    """Creates ``out_dir`` if needed and holds an exclusive lock on it; removes it again if the job left it empty.

    Raises:
        OutputLockedError: another process holds the lock (exit code 3).
        OutputError: the directory cannot be created or opened.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> OutputLock:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OutputError(f"output path {str(self.out_dir)!r} exists and is not a directory")
        try:
            self._created = not self.out_dir.exists()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as e:
            raise OutputError(f"cannot create or open output directory {str(self.out_dir)!r}: "
                              f"{e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise OutputError(f"cannot lock output directory {str(self.out_dir)!r}: {e.strerror or e}") from e
            pid = _holder_pid(fd)
            os.close(fd)
            holder = f"process {pid}" if pid is not None else "another process"
            raise OutputLockedError(
                f"output directory {str(self.out_dir)!r} is in use by another process ({holder} is writing a job "
                "there); wait for it to finish and re-run (a finished job is then a no-op), or choose another --out"
            ) from e
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._created:
            try:
                self.out_dir.rmdir()  # only succeeds when the job wrote nothing (e.g. a pre-flight check failed)
            except OSError:
                pass
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None
