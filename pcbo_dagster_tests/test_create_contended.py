"""`LakeStorage.create` at a name someone else keeps removing, or keeps replacing by a symbolic link,
between its attempts (someone who can write the lake): it gives up after `CREATE_ATTEMPTS` with an
error naming the file (exit 1), instead of retrying without bound. The other writer is played, on a
local disk and on moto's S3 server, by real writes around each create-only attempt."""

from __future__ import annotations

import os
import uuid

import pytest

from pcbo_dagster.lake import storage
from pcbo_dagster.lake.storage import CREATE_ATTEMPTS, LakeContended, LakeStorage

REL = "events/v1/20240101T000000Z/part-0.parquet"


def test_a_local_create_whose_name_keeps_becoming_a_symbolic_link_gives_up(tmp_path, monkeypatch):
    lake = LakeStorage(tmp_path / "lake")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not the lake's")
    real, planted = storage.create_file, []

    def link_planted_first(path, data, **kwargs):  # the other writer, before each attempt
        if len(planted) < 50:
            os.symlink(target, path)
            planted.append(path)
        return real(path, data, **kwargs)

    monkeypatch.setattr(storage, "create_file", link_planted_first)
    with pytest.raises(LakeContended) as caught:
        lake.create(REL, b"data")
    assert len(planted) == CREATE_ATTEMPTS
    assert lake.uri(REL) in str(caught.value) and caught.value.exit_status == 1
    assert target.read_bytes() == b"not the lake's"  # never written through


def test_an_object_store_create_whose_name_keeps_being_removed_gives_up(s3_store, monkeypatch):
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    lake = LakeStorage(s3_store.url(f"lake-{uuid.uuid4().hex[:8]}"))
    real, rounds = storage.create_object, []

    def taken_then_removed(fs, path, data):  # the other writer: the name taken, removed once refused
        if len(rounds) >= 50:
            return real(fs, path, data)
        fs.pipe_file(path, b"someone else's")
        created = real(fs, path, data)
        fs.rm_file(path)
        rounds.append(path)
        return created

    monkeypatch.setattr(storage, "create_object", taken_then_removed)
    with pytest.raises(LakeContended) as caught:
        lake.create(REL, b"data")
    assert len(rounds) == CREATE_ATTEMPTS
    assert lake.uri(REL) in str(caught.value)
    assert lake.read_if_exists(REL) is None
