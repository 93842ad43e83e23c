"""Opening a local file only when it is a regular file, never waiting on it.

`open_regular(path)` opens `path` for reading without blocking (a FIFO opened for reading would wait
for a writer forever), then judges the open file itself (`fstat`): anything but a regular file (a
FIFO, a device, a directory) is `NotRegularFile`; the file is then read as any file is.
`open_regular_fd(path, flags)` is the same open for any flags (appending, creating: a FIFO opened for
writing with no reader is `ENXIO`, refused the same way). The one such open of the code base: the
lake's files (`lake/storage.py`, with `follow_links=False`), the audit backup's (`audit/backup.py`),
configuration and checkpoint files, and every source file (`sources/local_files.py` adds a server's
confinement around it).
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

#: The flags of a checked open: never blocking on a FIFO, closed in child processes.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegularFile(ValueError):
    """The path opens something that is not a regular file."""


def open_regular(path: str, follow_links: bool = True) -> BinaryIO:
    """`path` opened for binary reading if it is a regular file (module doc); `FileNotFoundError` and
    other `OSError`s as `open` raises them (`follow_links=False`: a symbolic link at the name itself
    is not followed, an `OSError` with `errno.ELOOP`)."""
    return regular_file(os.open(path, OPEN_FLAGS | (0 if follow_links else os.O_NOFOLLOW)), path)


def open_regular_fd(path: str | os.PathLike[str], flags: int, mode: int = 0o644) -> int:
    """`os.open(path, flags, mode)` of a regular file only (module doc), the descriptor blocking as
    usual once judged; `NotRegularFile` for a FIFO, a device or a directory, other `OSError`s as
    `os.open` raises them."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO opened for writing with no reader; a directory
            raise NotRegularFile(f"{os.fspath(path)} is not a regular file") from exc
        raise
    return regular_fd(fd, os.fspath(path))


def regular_fd(fd: int, path: str) -> int:
    """The descriptor `fd` (opened with `O_NONBLOCK`) made blocking if it is a regular file, else
    `NotRegularFile` naming `path`; `fd` is closed on every error."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def regular_file(fd: int, path: str) -> BinaryIO:
    """The descriptor `fd` (opened with `OPEN_FLAGS`) as a blocking binary file if it is a regular
    file, else `NotRegularFile` naming `path`; `fd` is closed on every error."""
    return os.fdopen(regular_fd(fd, path), "rb")
