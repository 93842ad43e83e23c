"""`LakeStorage.swap`, the compare-and-swap every commit point write goes through (execute's commit
points and restorations, rollback's moves): on a local disk, moto's S3 server and the GCS emulator, it
replaces (or removes) a file only while it holds the bytes its writer read, and otherwise writes
nothing. (The GCS emulator ignores `ifGenerationMatch`: there only the comparison of the bytes read is
tested, not the store's own refusal of an object created or changed in between.)"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from pcbo_dagster.lake.storage import LakeStorage

REL = "events/v1/20240101T000000Z/_manifest.json"


@pytest.fixture(params=["local", "s3", "gs"])
def lake(request, tmp_path: Path, monkeypatch) -> LakeStorage:
    if request.param == "local":
        return LakeStorage(tmp_path / "lake")
    store = request.getfixturevalue("s3_store" if request.param == "s3" else "gcs_store")
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    return LakeStorage(store.url(f"lake-{uuid.uuid4().hex[:8]}"))


def test_a_commit_point_is_replaced_only_over_the_bytes_its_writer_read(lake):
    assert not lake.swap(REL, b"v1", b"v0")  # nothing there, something expected
    assert lake.read_if_exists(REL) is None
    assert lake.swap(REL, b"v1", None)
    if not lake.url.startswith("gs://"):  # (the emulator lets an `ifGenerationMatch=0` PUT overwrite)
        assert not lake.swap(REL, b"other", None)  # something there, nothing expected
    assert lake.swap(REL, b"v2", b"v1")
    assert not lake.swap(REL, b"stale", b"v1")  # another writer's v2 stays
    assert lake.read(REL) == b"v2"
    assert not lake.swap(REL, None, b"v1")
    assert lake.read(REL) == b"v2"
    assert lake.swap(REL, None, b"v2")
    assert lake.read_if_exists(REL) is None
    if lake.is_local:  # no temporary file left behind, refused or not
        assert os.listdir(os.path.dirname(lake._path(REL))) == []


def test_an_s3_object_whose_etag_is_no_md5_is_compared_by_its_bytes(s3_store, monkeypatch):
    """A multipart upload's ETag is no MD5 of its bytes: the first conditional PUT is refused, the
    object is read with its ETag, and, holding the expected bytes, replaced on that ETag."""
    for name, value in s3_store.env.items():
        monkeypatch.setenv(name, value)
    lake = LakeStorage(s3_store.url(f"lake-{uuid.uuid4().hex[:8]}"))
    path = lake._path(REL)
    bucket, key, _ = lake.fs.split_path(path)
    upload = lake.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    part = lake.fs.call_s3(
        "upload_part", Bucket=bucket, Key=key, PartNumber=1, UploadId=upload["UploadId"], Body=b"v1"
    )
    lake.fs.call_s3(
        "complete_multipart_upload",
        Bucket=bucket,
        Key=key,
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    assert "-" in lake.fs.info(path)["ETag"]
    assert not lake.swap(REL, b"stale", b"v0")
    assert lake.swap(REL, b"v2", b"v1")
    assert lake.read(REL) == b"v2"


def test_a_local_swap_waits_for_the_directory_lock_another_process_holds(tmp_path):
    """Locally the comparison and the rename happen under the partition directory's flock, which
    another process holding it makes wait (here: refused while it is held, done once let go)."""
    import fcntl
    import subprocess
    import sys

    lake = LakeStorage(tmp_path / "lake")
    assert lake.swap(REL, b"v1", None)
    directory = os.path.dirname(lake._path(REL))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('held', flush=True); sys.stdin.read()",
            directory,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        fd = os.open(directory, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert lake.swap(REL, b"v2", b"v1")
    assert lake.read(REL) == b"v2"
