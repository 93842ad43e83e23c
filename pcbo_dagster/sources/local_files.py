"""Opening a source's local file: a regular file only, and for a server, only inside its sources
directory.

`open_regular(path, root)` opens `path` without blocking (a FIFO opened for reading would wait for a
writer forever), then judges the open file itself (`fstat`): anything but a regular file (a FIFO, a
device, a directory) is `NotRegularFile`. With `root` (the HTTP API's sources directory, `pcbo serve`)
the file's real path as opened (`/proc/self/fd`, where the kernel says what was opened) must lie
inside `root`, and in none of its hidden paths (`.keys/`, where the home keeps a key): a symbolic link
out of it or into a hidden path, in the request's path or in a directory source or a ledger archive
below it, is `OutsideSources`, even one swapped in after the request was checked. Without
`root` (the CLI, Dagster: a user reading their own files) links are followed as the file system does.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO


class NotRegularFile(ValueError):
    """The path opens something that is not a regular file."""


class OutsideSources(ValueError):
    """The path leads (through a symbolic link) outside the sources directory."""


#: `place_in_sources`'s answers for a path a server may not read.
OUTSIDE, HIDDEN = "outside", "hidden"


def place_in_sources(real: str, root: str) -> str | None:
    """Where the real path `real` lies for a server reading its sources directory `root` (a real path
    too): `OUTSIDE` it, in one of its `HIDDEN` paths (a part below `root` starting with `.`: `.keys/`,
    where the home keeps a key), or None when a server may read it. The one judgement of both the
    request's own path (`engine/request_loading.py`) and every file opened (`open_regular`)."""
    root = root.rstrip("/") or "/"
    if real == root:
        return None
    prefix = root if root == "/" else root + "/"
    if not real.startswith(prefix):
        return OUTSIDE
    return HIDDEN if any(part.startswith(".") for part in real[len(prefix) :].split("/")) else None


def open_regular(path: str, root: str | None = None) -> BinaryIO:
    """`path` opened for binary reading (module doc); `FileNotFoundError` and other `OSError`s as
    `open` raises them."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file")
        if root is not None:
            real_root = os.path.realpath(root)
            try:
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # no /proc (not Linux): the path's real path now, a weaker check
                opened = os.path.realpath(path)
            if place_in_sources(opened, real_root) is not None:
                raise OutsideSources(f"{path} leads outside the sources directory {real_root}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
