"""Opening a source's local file: a regular file only, and for a server, only inside its sources
directory and in none of pcbo's own stores there.

`open_source_file(path, sources)` opens `path` as `io/regular_files.open_regular` does (without
blocking, a regular file only: `NotRegularFile`). With `sources` (the HTTP API's sources directory,
`pcbo serve`: a `SourcesDirectory`) the file's real path as opened (`/proc/self/fd`, where the kernel says
what was opened) must lie inside it, in none of its hidden paths (`.keys/`, where the home keeps a
key) and in none of pcbo's own stores (the lake, the audit backup, the catalog database and its
journals, the Iceberg catalog, ...: `Settings.own_paths`), nor be the same file as one of them (a
hard link to the catalog): a symbolic link out of it or into a hidden path or a store, in the
request's path or in a directory source or a ledger archive below it, is `OutsideSources`, even one
swapped in after the request was checked. On Linux the file is judged before it is opened for
reading (an `O_PATH` descriptor, which reads nothing and whose closing releases no lock, then
reopened through `/proc/self/fd`): opening and closing a SQLite database the process uses, even for
a moment, drops every POSIX lock SQLite holds on it. Without `sources` (the CLI, Dagster: a user
reading their own files) links are followed as the file system does.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from pcbo_dagster.io.regular_files import OPEN_FLAGS, NotRegularFile, open_regular, regular_file

#: `place_in_sources`'s answers for a path a server may not read.
OUTSIDE, HIDDEN, STORE = "outside", "hidden", "store"

#: How an error says where a refused file leads, by `place_in_sources`'s answer.
REASONS = {
    OUTSIDE: "leads outside the server's sources directory",
    HIDDEN: "leads into a hidden path of the server's sources directory",
    STORE: "leads into one of the server's own stores (its lake, audit backup or catalog), not a source",
}


class OutsideSources(ValueError):
    """The path leads (through a symbolic link) outside the sources directory, into a hidden path of
    it or into one of pcbo's own stores (`place`: `place_in_sources`'s answer; `reason`: the words)."""

    def __init__(self, path: str, place: str) -> None:
        self.place = place
        self.reason = REASONS[place]
        super().__init__(f"{path} {self.reason}")


@dataclass(frozen=True)
class SourcesDirectory:
    """A server's sources directory (`root`) and pcbo's own stores (`stores`: the files and
    directories it writes, `Settings.own_paths`), real paths all, which a server never reads as a
    source though they may lie in the directory (the default one is `$PCBO_HOME`)."""

    root: str
    stores: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, root: str | os.PathLike[str], stores: Iterable[str | os.PathLike[str]] = ()
    ) -> SourcesDirectory:
        return cls(os.path.realpath(root), tuple(sorted({os.path.realpath(s) for s in stores})))

    def __str__(self) -> str:
        return self.root


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root if root == "/" else root + "/")


def _same_file_as_a_store(status: os.stat_result, stores: tuple[str, ...]) -> bool:
    for store in stores:
        try:
            other = os.stat(store)  # a stat, never an open: see the module doc
        except OSError:
            continue
        if stat.S_ISREG(other.st_mode) and (other.st_dev, other.st_ino) == (status.st_dev, status.st_ino):
            return True
    return False


def place_in_sources(
    real: str, sources: SourcesDirectory, status: os.stat_result | None = None
) -> str | None:
    """Where the real path `real` (the file `status` is, when known) lies for a server reading its
    sources directory `sources`: `OUTSIDE` it, in one of its `HIDDEN` paths (a part below the root
    starting with `.`: `.keys/`, where the home keeps a key), in (or the same file as) one of pcbo's
    own stores (`STORE`: the lake, the audit backup, the catalog, ...), or None when a server may read
    it. The one judgement of both the request's own path (`engine/request_loading.py`) and every file
    opened (`open_source_file`), made before the file is opened for reading."""
    root = sources.root.rstrip("/") or "/"
    if not _inside(real, root):
        return OUTSIDE
    if real != root and any(part.startswith(".") for part in real[len(root) :].lstrip("/").split("/")):
        return HIDDEN
    if any(_inside(real, store) for store in sources.stores):
        return STORE
    if status is not None and _same_file_as_a_store(status, sources.stores):
        return STORE
    return None


def open_source_file(path: str, sources: SourcesDirectory | None = None) -> BinaryIO:
    """The source file `path` opened for binary reading (module doc): without `sources` as
    `open_regular` opens it; `FileNotFoundError` and other `OSError`s as `open` raises them."""
    if sources is None:
        return open_regular(path)
    file = regular_file(_open_judged(path, sources, OPEN_FLAGS), path)
    if not _REOPENS:  # judged before opening too: see there
        try:
            _judge(path, os.path.realpath(path), os.fstat(file.fileno()), sources)
        except BaseException:
            file.close()
            raise
    return file


#: Whether a file can be judged through an `O_PATH` descriptor and reopened (`_open_judged`): Linux.
_REOPENS = hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd")


def _judge(path: str, real: str, status: os.stat_result, sources: SourcesDirectory) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise NotRegularFile(f"{path} is not a regular file")
    place = place_in_sources(real, sources, status)
    if place is not None:
        raise OutsideSources(path, place)


def _open_judged(path: str, sources: SourcesDirectory, flags: int) -> int:
    """`path` opened with `flags` once the file it names is judged (`_judge`) without being opened for
    reading: on Linux through an `O_PATH` descriptor, reopened through `/proc/self/fd` (the very file
    judged); elsewhere (no `O_PATH` or no `/proc`) by its real path and `stat` now (a weaker check,
    made again once opened)."""
    if not _REOPENS:
        _judge(path, os.path.realpath(path), os.stat(path), sources)
        return os.open(path, flags)
    handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        _judge(path, os.readlink(f"/proc/self/fd/{handle}"), os.fstat(handle), sources)
        return os.open(f"/proc/self/fd/{handle}", flags)
    finally:
        os.close(handle)
