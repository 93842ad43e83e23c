"""`LakeStorage.sync()` on a local disk fsyncs exactly what was written or removed since the last sync:
each file, and each directory whose entries changed (new files, renames, removals, new directories),
never `os.sync()` of the whole host (issue 18)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

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


def _many_files(lake: LakeStorage, count: int) -> None:
    for i in range(count):
        lake.write(f"ds/v1/k{i % 5}/part-{i}.parquet", b"x")


def test_sync_issues_its_fsyncs_on_several_threads_at_once(tmp_path: Path, monkeypatch) -> None:
    """The fsyncs of one sync overlap (their disk waits do): the first `SYNC_THREADS` of them meet at
    a barrier that only that many threads waiting at once can pass; every job is still fsynced once."""
    lake = LakeStorage(tmp_path / "lake")
    _many_files(lake, 40)
    barrier = threading.Barrier(storage.SYNC_THREADS, timeout=10)
    synced: list[tuple[str, bool]] = []
    lock = threading.Lock()
    real = storage._fsync_path

    def meeting(path: str, directory: bool = False) -> None:
        with lock:
            synced.append((path, directory))
            first = len(synced) <= storage.SYNC_THREADS
        if first:
            barrier.wait()  # BrokenBarrierError unless SYNC_THREADS fsyncs are in flight together
        real(path, directory)

    monkeypatch.setattr(storage, "_fsync_path", meeting)
    lake.sync()
    root = str((tmp_path / "lake").resolve())
    files = [p for p, d in synced if not d]
    assert sorted(files) == sorted(f"{root}/ds/v1/k{i % 5}/part-{i}.parquet" for i in range(40))
    assert {p for p, d in synced if d} >= {f"{root}/ds/v1/k{i}" for i in range(5)}
    assert len(synced) == len(set(synced))


def test_a_failed_fsync_fails_the_sync_and_the_others_still_run(tmp_path: Path, monkeypatch) -> None:
    lake = LakeStorage(tmp_path / "lake")
    _many_files(lake, 20)
    synced: list[str] = []
    lock = threading.Lock()

    def failing(path: str, directory: bool = False) -> None:
        with lock:
            synced.append(path)
        if path.endswith("/part-3.parquet") or path.endswith("/part-11.parquet"):
            raise OSError(5, "Input/output error", path)

    monkeypatch.setattr(storage, "_fsync_path", failing)
    with pytest.raises(OSError) as caught:
        lake.sync()
    assert caught.value.errno == 5 and caught.value.filename.endswith(("/part-3.parquet", "/part-11.parquet"))
    assert sum(p.endswith(".parquet") for p in synced) == 20  # every file's fsync was issued
