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

    def uri(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def write_atomic(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        if self.is_local:
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            self.fs.pipe_file(path, data)

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
