"""`LakeStorage.sync()` on a local disk fsyncs exactly what was written or removed since the last sync:
each file, and each directory whose entries changed (new files, renames, removals, new directories),
never `os.sync()` of the whole host (issue 18)."""

from __future__ import annotations

import os
from pathlib import Path

from pcbo_dagster.lake import storage
from pcbo_dagster.lake.storage import LakeStorage


def _recording(monkeypatch) -> list[tuple[str, bool]]:
    synced: list[tuple[str, bool]] = []
    real = storage._fsync_path

    def record(path: str, directory: bool = False) -> None:
        synced.append((path, directory))
        real(path, directory)

    monkeypatch.setattr(storage, "_fsync_path", record)
    monkeypatch.setattr(os, "sync", lambda: (_ for _ in ()).throw(AssertionError("os.sync() called")))
    return synced


def test_sync_fsyncs_the_written_files_and_their_directories(tmp_path: Path, monkeypatch) -> None:
    synced = _recording(monkeypatch)
    lake = LakeStorage(tmp_path / "lake")
    root = str((tmp_path / "lake").resolve())
    lake.write("ds/v1/k1/part-a.parquet", b"a")
    lake.write("ds/v1/k1/_versions/v000001.json", b"m")
    lake.write_atomic("ds/v1/k1/_manifest.json", b"c")
    lake.sync()
    files = {p for p, d in synced if not d}
    dirs = {p for p, d in synced if d}
    assert files == {
        f"{root}/ds/v1/k1/part-a.parquet",
        f"{root}/ds/v1/k1/_versions/v000001.json",
        f"{root}/ds/v1/k1/_manifest.json",
    }
    # every directory that gained an entry, up to the lake's root (the new `ds` is an entry of it)
    assert {f"{root}/ds/v1/k1", f"{root}/ds/v1/k1/_versions", f"{root}/ds/v1", f"{root}/ds", root} <= dirs
    synced.clear()
    lake.sync()
    assert synced == []  # nothing new: nothing to sync

    lake.write_atomic("ds/v1/k1/_manifest.json", b"d", durable=True)  # fsynced already: its directory
    lake.delete("ds/v1/k1/part-a.parquet")
    lake.sync()
    assert synced == [(f"{root}/ds/v1/k1", True)]
