"""Lake storage through fsspec: local paths, `file://`, and (with s3fs / gcsfs) `s3://` and `gs://`.

Every write is all-or-nothing under its final name: locally a temporary file renamed into place,
on object stores a single PUT. Paths given to the methods are relative to the lake root.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


def normalize_lake_url(url: str | os.PathLike[str]) -> str:
    text = os.fspath(url)
    if "://" not in text:
        return "file://" + str(Path(text).expanduser().resolve())
    return text.rstrip("/")


class LakeStorage:
    def __init__(self, url: str | os.PathLike[str]) -> None:
        self.url = normalize_lake_url(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._made_dirs: set[str] = set()

    def uri(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _local_dir(self, path: str) -> None:
        directory = os.path.dirname(path)
        if directory not in self._made_dirs:
            os.makedirs(directory, exist_ok=True)
            self._made_dirs.add(directory)

    def write(self, rel: str, data: bytes) -> None:
        """Write a file that nothing reads until a later commit point names it (data files, version
        and rollback manifests): a crash may leave it partial, and the next run rewrites it whole.
        Durable only after `sync()`."""
        path = self._path(rel)
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return
        self._local_dir(path)
        with open(path, "wb") as fh:
            fh.write(data)

    def write_atomic(self, rel: str, data: bytes, durable: bool = False) -> None:
        """Replace a file all-or-nothing (a temporary file renamed into place; a single PUT on an
        object store). `durable=True` fsyncs it before the rename; otherwise call `sync()` later."""
        path = self._path(rel)
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return
        self._local_dir(path)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def sync(self) -> None:
        """Make every write so far durable (local disks: one sync of the file systems; object stores
        are durable on PUT)."""
        if self.is_local:
            os.sync()

    def read_if_exists(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(rel))
        except FileNotFoundError:
            return None

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def delete(self, rel: str) -> None:
        path = self._path(rel)
        if self.fs.exists(path):
            self.fs.rm_file(path)

    def find(self, name: str, under: str = "") -> list[str]:
        """Relative paths of every file called `name` below `under`, sorted."""
        base = self._path(under) if under else self.root
        if not self.fs.exists(base):
            return []
        prefix = self.root + "/"
        found = [p for p in self.fs.find(base) if p.rsplit("/", 1)[-1] == name]
        return sorted(p[len(prefix) :] if p.startswith(prefix) else p for p in found)

    def list_files(self, under: str) -> list[str]:
        base = self._path(under)
        if not self.fs.exists(base):
            return []
        prefix = self.root + "/"
        return sorted(p[len(prefix) :] for p in self.fs.find(base))
