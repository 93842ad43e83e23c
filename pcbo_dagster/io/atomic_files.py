"""Writing a local file all-or-nothing through a temporary file beside it: replaced (`replace_file`,
renamed into place), created only where no file is (`create_file`, linked into place), or swapped only
over the bytes its writer read (`swap_file`, renamed under a lock of its directory).

Files get the mode a plain `open(path, "w")` would give them (0666 less the process's umask: 0644
under the usual 022), so everyone who may read the lake reads its commit points as well as its data
files; a secret is created with an explicit `mode` (0600)."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO


@contextmanager
def replacing(
    path: str | os.PathLike[str], *, durable: bool = False, prefix: str = ".tmp-", mode: int = 0o666
) -> Iterator[BinaryIO]:
    """A temporary file in `path`'s directory to write, renamed over `path` when the block ends without
    an exception, so a reader sees the old bytes or the new ones, never a part. `durable=True` fsyncs
    before the rename. The temporary file is removed if anything fails. The file's `mode` (less the
    umask) is the new file's."""
    fd, tmp = _create_temporary(path, mode, prefix)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_file(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    durable: bool = False,
    prefix: str = ".tmp-",
    mode: int = 0o666,
) -> None:
    """Write `data` to `path` through `replacing`."""
    with replacing(path, durable=durable, prefix=prefix, mode=mode) as fh:
        fh.write(data)


def _create_temporary(path: str | os.PathLike[str], mode: int, prefix: str) -> tuple[int, str]:
    """A new empty temporary file beside `path`, created exclusively with `mode` (less the umask) and
    never through a symbolic link: its descriptor, open for writing, and its path."""
    directory = os.path.dirname(os.fspath(path)) or "."
    name = f"{prefix}{os.path.basename(os.fspath(path))}-{os.getpid()}-{os.urandom(6).hex()}"
    tmp = os.path.join(directory, name)
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode), tmp


def _temporary(path: str | os.PathLike[str], data: bytes, *, durable: bool, mode: int, prefix: str) -> str:
    """A new temporary file beside `path` holding `data` (fsynced when `durable`), created exclusively
    and never through a symbolic link: its path."""
    fd, tmp = _create_temporary(path, mode, prefix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def create_file(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    durable: bool = False,
    mode: int = 0o666,
    prefix: str = ".tmp-",
) -> bool:
    """Create `path` holding `data`, whole or not at all, never replacing what is there: a temporary file
    beside it is written, then hard-linked to `path` (the link fails when the name exists, a symbolic
    link included, which is never followed) and removed. True when created; False when the name was
    already taken (nothing written). `durable=True` fsyncs the file before it is linked."""
    tmp = _temporary(path, data, durable=durable, mode=mode, prefix=prefix)
    try:
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(tmp)


def swap_file(
    path: str | os.PathLike[str],
    data: bytes | None,
    expected: bytes | None,
    *,
    durable: bool = False,
    prefix: str = ".tmp-",
) -> bool:
    """Compare-and-swap a file: put `data` at `path` (None: remove it), whole or not at all, only while
    `path` holds exactly `expected` (None: no file there). True when done; False when it held anything
    else, a symbolic link included (nothing changed).

    The new bytes are written to a temporary file beside `path` first; the comparison and the rename
    (or removal) then happen under an exclusive `flock` of `path`'s directory, which every writer going
    through here takes, in this process or any other on the host: held for a read of one small file
    and a rename, never while writing. `durable=True` fsyncs the new file before the rename."""
    directory = os.path.dirname(os.fspath(path)) or "."
    tmp = None if data is None else _temporary(path, data, durable=durable, mode=0o666, prefix=prefix)
    try:
        lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                held = None
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                return False  # a symbolic link: never what a writer read
            else:
                with os.fdopen(fd, "rb") as fh:
                    held = fh.read()
            if held != expected:
                return False
            if tmp is not None:
                os.replace(tmp, path)
                tmp = None
            elif held is not None:
                os.unlink(path)
            return True
        finally:
            os.close(lock)  # lets the lock go
    finally:
        if tmp is not None:
            os.unlink(tmp)
