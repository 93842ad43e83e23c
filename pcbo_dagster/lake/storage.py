"""Lake storage through fsspec: local paths, `file://`, and (with s3fs / gcsfs) `s3://` and `gs://`.

Every write is all-or-nothing under its final name: locally a temporary file renamed into place,
on object stores a single PUT. Paths given to the methods are relative to the lake root.

Object stores take their endpoints and credentials from the environment only (never from a file,
never logged):
- `s3://`: `PCBO_S3_ENDPOINT_URL` (else `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`) for an
  S3-compatible server; credentials and region through botocore's own variables (`AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_DEFAULT_REGION`, ...).
- `gs://`: `STORAGE_EMULATOR_HOST` for an emulator (then anonymous access, and gcsfs's gRPC
  bucket-type probe is turned off unless `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT` says otherwise);
  otherwise Google's default credentials (`GOOGLE_APPLICATION_CREDENTIALS`, ...), project from
  `GOOGLE_CLOUD_PROJECT`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from pcbo_dagster.core.errors import IntegrityError
from pcbo_dagster.io.atomic_files import create_file, replace_file, swap_file
from pcbo_dagster.io.redaction import is_store_error, one_line_error, redact_url
from pcbo_dagster.io.regular_files import NotRegularFile, open_regular
from pcbo_dagster.lake.layout import OutsidePartition

#: Object stores are shared: another host may write or remove any object at any time, so no
#: directory listing is kept for later (s3fs and gcsfs keep every listing for ever by default, in a
#: file system object fsspec keeps for the process, and answer `exists`, `size` and even `cat_file`
#: from it: a long-lived process would not see a commit point another host wrote after its listing,
#: and a rollback's delete of it would remove nothing).
_NO_LISTINGS_CACHE: dict[str, object] = {"use_listings_cache": False}


#: Attempts of `LakeStorage.create` at a name that is removed (or replaced by a symbolic link) between
#: its create-only write and its read of what holds the name, before it gives up.
CREATE_ATTEMPTS = 4


class LakeContended(IntegrityError):
    """A create-only write whose name kept being removed, or replaced by a symbolic link, between its
    attempts (someone else writing the lake): exit status 1, nothing of this file written."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        super().__init__(
            f"{uri}: its name was removed or replaced by a symbolic link between each of {CREATE_ATTEMPTS} "
            "attempts to create it (something else is writing the lake); this file was not written"
        )


class StoreUnavailable(OSError):
    """An object store did not answer a read: down, connection refused or reset, a timeout, a 5xx
    after the client's retries, access denied. Nothing can be concluded about what the store holds,
    so this is never a finding (neither "missing" nor "not an event"): the command stops, exit 1,
    naming the store, the object and the failure. A missing object is `FileNotFoundError`, not this."""

    def __init__(self, store: str, what: str, cause: BaseException) -> None:
        self.store, self.what = store, what
        super().__init__(
            f"store unavailable: {store} could not be read ({what}: {one_line_error(cause)}); "
            "nothing was concluded from it: check the store's health and access, then run again"
        )


@contextmanager
def store_reading(store: str, what: str) -> Iterator[None]:
    """Turn a failed read of an object store into `StoreUnavailable` naming `store` (redacted) and
    `what`; a missing object (`FileNotFoundError`) and anything that is not a store's error (a bug)
    pass through as they are."""
    try:
        yield
    except FileNotFoundError:
        raise
    except StoreUnavailable:
        raise
    except Exception as exc:
        if not is_store_error(exc):
            raise
        raise StoreUnavailable(store, what, exc) from exc


def storage_options(url: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """fsspec options for `url` from the environment (endpoints; credentials stay with the SDKs)."""
    env = dict(os.environ if env is None else env)
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    if scheme in ("s3", "s3a"):
        endpoint = (
            env.get("PCBO_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        )
        return {**_NO_LISTINGS_CACHE, **({"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {})}
    if scheme in ("gs", "gcs"):
        options: dict[str, object] = dict(_NO_LISTINGS_CACHE)
        emulator = env.get("STORAGE_EMULATOR_HOST", "")
        if emulator not in ("", "default"):
            if not env.get("GOOGLE_APPLICATION_CREDENTIALS"):
                options["token"] = "anon"
        project = env.get("GOOGLE_CLOUD_PROJECT") or env.get("GCSFS_DEFAULT_PROJECT")
        if project:
            options["project"] = project
        return options
    return {}


def create_object(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create an object store's object create-only (S3 `PutObject` with `If-None-Match: *`, GCS
    `ifGenerationMatch=0`: fsspec's `mode="create"`): True when created, False when an object was
    already there (nothing written; the store itself refuses, whoever else is writing)."""
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def swap_object(fs: fsspec.AbstractFileSystem, path: str, data: bytes | None, expected: bytes | None) -> bool:
    """Compare-and-swap an object store's object (the commit points): put `data` at `path` (None:
    delete it) only while the object there is exactly `expected` (None: no object), the store itself
    refusing otherwise, whoever else is writing. True when done; False when it held anything else
    (nothing written).

    S3: `If-None-Match: *` when nothing is expected, else `If-Match` with the expected bytes' MD5 (the
    ETag S3 gives a single-part PUT: no extra request); refused, the object is read with its ETag once
    (an encrypted or multipart object's ETag is no MD5) and, holding the expected bytes, put again with
    that ETag. GCS: the object's generation and that generation's bytes read, then `ifGenerationMatch`
    on it (0: no object). The same bytes put back by another writer in between (A, B, A) are not told
    apart."""
    if expected is None:
        if data is None:
            return not fs.exists(path)
        return create_object(fs, path, data)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("s3", "s3a"):
        return _swap_s3(fs, path, data, expected)
    if protocol in ("gs", "gcs"):
        return _swap_gcs(fs, path, data, expected)
    raise NotImplementedError(f"no conditional write on {protocol}:// objects")


def _swap_s3(fs: Any, path: str, data: bytes | None, expected: bytes) -> bool:
    from botocore.exceptions import ClientError

    bucket, key, _ = fs.split_path(path)
    etag = f'"{hashlib.md5(expected, usedforsecurity=False).hexdigest()}"'
    for attempt in range(2):
        try:
            if data is None:
                fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=etag)
            else:
                fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=etag)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            cause = exc.__cause__
            code = cause.response.get("Error", {}).get("Code") if isinstance(cause, ClientError) else None
            # 412: another object; 409: a conditional write racing another writer's
            if code not in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise
        if attempt:
            return False
        try:
            held, etag = fsspec.asyn.sync(fs.loop, _s3_get, fs, bucket, key)
        except FileNotFoundError:
            return False
        if held != expected:
            return False
    return False


async def _s3_get(fs: Any, bucket: str, key: str) -> tuple[bytes, str]:
    """An S3 object's bytes and their ETag, from one GET."""
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    try:
        return bytes(await response["Body"].read()), str(response["ETag"])
    finally:
        response["Body"].close()


def _swap_gcs(fs: Any, path: str, data: bytes | None, expected: bytes) -> bool:
    bucket, key, _ = fs.split_path(path)
    try:  # the object's generation, then the bytes of exactly that generation
        generation = str(fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True)["generation"])
        _, held = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media", generation=generation)
    except FileNotFoundError:
        return False
    if bytes(held) != expected:
        return False
    try:
        if data is None:
            fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=generation)
        else:
            fs.call(
                "POST",
                f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                uploadType="media",
                name=key,
                ifGenerationMatch=generation,
                headers={"Content-Type": "application/octet-stream"},
                data=data,
                json_out=True,
            )
    except (FileExistsError, FileNotFoundError):  # 412 (another generation), 404 (gone)
        return False
    return True


def _gcs_probe_off(env: dict[str, str]) -> bool:
    """gcsfs probes each bucket's type over gRPC (its "experimental" file system, on by default); an
    emulator does not answer that probe and every open stalls about a minute. Off when an emulator is
    set, unless `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT` says otherwise; off whenever that variable is false."""
    flag = env.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
    if flag is not None:
        return flag.lower() not in ("true", "1")
    return env.get("STORAGE_EMULATOR_HOST", "") not in ("", "default")


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, path inside it) for a URL or local path, configured from the environment."""
    options = storage_options(url)
    if url.split("://", 1)[0].lower() in ("gs", "gcs") and _gcs_probe_off(dict(os.environ)):
        # the plain GCSFileSystem, whatever gcsfs chose at import time
        from gcsfs.core import GCSFileSystem

        fs = GCSFileSystem(**options)
        return fs, fs._strip_protocol(url)
    return fsspec.core.url_to_fs(url, **options)


#: Threads issuing a local sync's fsyncs at once (one pool per process, made on first use).
SYNC_THREADS = 4
_SYNC_POOLS: dict[int, ThreadPoolExecutor] = {}
_SYNC_POOL_LOCK = threading.Lock()


def _sync_pool() -> ThreadPoolExecutor:
    """This process's fsync pool. Keyed by process id: a forked child inherits its parent's pool
    object but none of its threads, so it makes its own (work given to the inherited one would wait
    for ever)."""
    pid = os.getpid()
    with _SYNC_POOL_LOCK:
        pool = _SYNC_POOLS.get(pid)
        if pool is None:
            _SYNC_POOLS.clear()  # an inherited parent's pool: never used here
            pool = _SYNC_POOLS[pid] = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="pcbo-fsync")
        return pool


def _fsync_path(path: str, directory: bool = False) -> None:
    """fsync a local file or directory by its path (gone since: nothing left to make durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_together(jobs: list[tuple[str, bool]]) -> None:
    """fsync each (path, is a directory) of `jobs` on the fsync pool's threads, up to `SYNC_THREADS` at
    once; returns when all are done, raising the first failure (the others still run). Each thread takes
    the next job as it finishes one: a few tasks on the pool, not a future (lock, condition) per fsync."""
    pending = deque(jobs)
    failures: list[Exception] = []

    def drain() -> None:
        while True:
            try:
                path, directory = pending.popleft()  # (atomic: each job is taken by one thread)
            except IndexError:
                return
            try:
                _fsync_path(path, directory)
            except Exception as exc:
                failures.append(exc)

    for _ in _sync_pool().map(lambda _: drain(), range(min(SYNC_THREADS, len(jobs)))):
        pass
    if failures:
        raise failures[0]


def _make_dirs(directory: str) -> list[str]:
    """Make `directory` and each missing one on the way to it, as `os.makedirs(exist_ok=True)` does
    (`FileExistsError` when a name on the way is not a directory) but trying the deepest first: one
    `mkdir` when only it is missing. Returns the directories this call made, outermost first."""
    made: list[str] = []
    pending = [directory]
    while pending:
        current = pending[-1]
        try:
            os.mkdir(current)
        except FileNotFoundError:
            parent = os.path.dirname(current)
            if not parent or parent == current:
                raise
            pending.append(parent)  # its parent first, then it again
            continue
        except FileExistsError:
            if not os.path.isdir(current):
                raise
        else:
            made.append(current)
        pending.pop()
    return made


def normalize_lake_url(url: str | os.PathLike[str]) -> str:
    text = os.fspath(url)
    if "://" not in text:
        return "file://" + str(Path(text).expanduser().resolve())
    return text.rstrip("/")


def _plain(rel: str) -> bool:
    """A relative path of plain names: not empty, not absolute, no `.`, `..`, empty name or backslash."""
    return (
        bool(rel)
        and not rel.startswith("/")
        and "\\" not in rel
        and all(p not in ("", ".", "..") for p in rel.split("/"))
    )


def _leads_outside(rel: str) -> OutsidePartition:
    """The refusal of a path below the lake's root that is not plain or meets a symbolic link."""
    return OutsidePartition(f"{rel!r} leads outside the lake or through a symbolic link")


def _read_local(rel: str, path: str) -> bytes:
    """The bytes of the local lake file `rel` at `path` (`_open_local`)."""
    with _open_local(rel, path) as fh:
        return fh.read()


def _open_local(rel: str, path: str) -> BinaryIO:
    """The local lake file `rel` at `path`, opened without blocking and without following a link at
    the name (`open_regular`): a name that is no regular file (a FIFO, which a plain open waits on for
    a writer for ever, a device, a directory) is refused as a symbolic link is (`OutsidePartition`).
    `FileNotFoundError` when missing."""
    try:
        return open_regular(path, follow_links=False)
    except (NotRegularFile, IsADirectoryError):
        raise OutsidePartition(f"{rel!r} is not a regular file (a FIFO, a device or a directory)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # (a link planted at the name since it was looked at)
            raise _leads_outside(rel) from None
        raise


class LakeStorage:
    def __init__(self, url: str | os.PathLike[str]) -> None:
        self.url = normalize_lake_url(url)
        self.public_url = redact_url(self.url)
        self.fs, root = filesystem(self.url)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._made_dirs: set[str] = set()
        # Local disks: what `sync()` must make durable (files written, directories whose entries
        # changed) since the last one. Writers may be worker threads.
        self._unsynced_files: list[str] = []
        self._unsynced_dirs: set[str] = set()
        self._unsynced_lock = threading.Lock()

    def inside(self, rel: str) -> bool:
        """True when `rel` names a place inside the lake: no `..` or absolute path, and on a local disk
        no symbolic link on the way (object stores have no links). pcbo never makes a link in a lake;
        one that leads out of the lake, or into another partition, or is planted where a file will be
        written, would let a write or a read reach what its path does not name."""
        return _plain(rel) and self._no_link(rel)

    def _no_link(self, rel: str, seen: dict[str, bool] | None = None) -> bool:
        """No symbolic link at any name of `rel` below the lake's root (a plain relative path): each is
        looked at without following it, from the root down, until one does not exist (nothing below it
        does either). The root itself and what leads to it are the operator's: resolved when the lake
        was opened (`normalize_lake_url`). `seen` (`refuse_links`): what was found of each name already
        looked at (True: there, and no link), read and filled in, so that a name shared by many paths is
        looked at once."""
        if not self.is_local or not rel:
            return True
        path = self.root
        for name in rel.split("/"):
            path = f"{path}/{name}"
            there = seen.get(path) if seen is not None else None
            if there is None:
                try:
                    mode = os.lstat(path).st_mode
                except OSError:  # missing (or not a directory's entry): no link on the way from here
                    there = False
                else:
                    if stat.S_ISLNK(mode):
                        return False
                    there = True
                if seen is not None:
                    seen[path] = there
            if not there:
                return True
        return True

    def refuse_links(self, rels: Iterable[str]) -> None:
        """`OutsidePartition` naming the first of `rels` with a symbolic link at it or on the way to it
        (`_no_link`, each name below the root looked at once however many of `rels` share it): a
        command's check, before it writes anything, of the places it will write (a directory it writes
        in, a name it reads before replacing). Each write and read still checks its own path when it
        comes (a link planted after this check is refused there)."""
        seen: dict[str, bool] = {}
        for rel in rels:
            if not _plain(rel) or not self._no_link(rel, seen):
                raise _leads_outside(rel)

    def uri(self, rel: str) -> str:
        """The URI of `rel` as outputs, events and the catalog show it (never with credentials)."""
        return f"{self.public_url}/{rel}"

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _inside(self, rel: str) -> str:
        """The path of `rel`; `OutsidePartition` when it would leave the lake (see `inside`)."""
        if not self.inside(rel):
            raise _leads_outside(rel)
        return self._path(rel)

    def _to_write(self, rel: str) -> str:
        """The path of `rel` for a write that replaces whatever stands at its name (a file, or a link
        planted there: the name is replaced, never written through); `OutsidePartition` when `rel` is
        not a plain path or a symbolic link lies on the way to its directory."""
        if not _plain(rel) or not self._no_link(os.path.dirname(rel)):
            raise _leads_outside(rel)
        return self._path(rel)

    def _local_dir(self, path: str) -> None:
        directory = os.path.dirname(path)
        if directory not in self._made_dirs:
            created = _make_dirs(directory)
            self._made_dirs.add(directory)
            if created:  # each new directory is an entry of its parent: those must be synced too
                with self._unsynced_lock:
                    self._unsynced_dirs.update(os.path.dirname(d) for d in created)

    def _written(self, path: str, data_too: bool = True) -> None:
        """Note a local file (when `data_too`) and its directory's entry for the next `sync()`."""
        with self._unsynced_lock:
            if data_too:
                self._unsynced_files.append(path)
            self._unsynced_dirs.add(os.path.dirname(path))

    def write(self, rel: str, data: bytes) -> None:
        """Write a file that nothing reads until a later commit point names it (data files, version
        and rollback manifests): a crash may leave it partial, and the next run rewrites it whole.
        Durable only after `sync()`."""
        path = self._to_write(rel)
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return
        self._local_dir(path)
        # A new file, never one already there: a link planted at this name (a hard link no path check
        # can see, or a symbolic one) loses its name here instead of being written through.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        self._written(path)

    def create(self, rel: str, data: bytes) -> bytes | None:
        """Write a file create-only, whole or not at all: never over a file already at its name (another
        writer's, e.g. a run frozen past its write lease that wakes while a new holder stages the same
        version). Returns None when written (durable after `sync()`), else what the file there holds
        (nothing written: the caller compares). Locally a temporary file linked into place (a symbolic
        link planted at the name is not a file: it loses its name, never written through); on object
        stores a single create-only PUT (`create_object`). A name removed (or, locally, replaced by a
        symbolic link) between each of `CREATE_ATTEMPTS` attempts: `LakeContended`, exit 1."""
        path = self._to_write(rel)
        if not self.is_local:
            for _ in range(CREATE_ATTEMPTS):
                if create_object(self.fs, path, data):
                    return None
                try:
                    with self._reading(rel):
                        return bytes(self.fs.cat_file(path))
                except FileNotFoundError:
                    continue  # removed in between: create it again
            raise LakeContended(self.uri(rel))
        self._local_dir(path)
        for _ in range(CREATE_ATTEMPTS):
            if create_file(path, data):
                self._written(path)
                return None
            try:
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    os.unlink(path)
                    continue
                return _read_local(rel, path)
            except FileNotFoundError:
                continue
        raise LakeContended(self.uri(rel))

    def write_atomic(self, rel: str, data: bytes, durable: bool = False) -> None:
        """Replace a file all-or-nothing (a temporary file renamed into place; a single PUT on an
        object store). `durable=True` fsyncs it before the rename; otherwise call `sync()` later."""
        path = self._to_write(rel)
        if not self.is_local:
            self.fs.pipe_file(path, data)
            return
        self._local_dir(path)
        replace_file(path, data, durable=durable)
        self._written(path, data_too=not durable)

    def swap(self, rel: str, data: bytes | None, expected: bytes | None, durable: bool = False) -> bool:
        """Compare-and-swap a file (a commit point): put `data` at `rel` (None: remove it) only while it
        holds exactly `expected` (None: no file), the bytes its writer decided from. True when done;
        False when another writer changed it since (nothing written). Locally `swap_file` (a flock of
        the partition directory around the comparison and the rename), on object stores a conditional
        PUT or DELETE (`swap_object`). `durable=True` fsyncs a local file before its rename; otherwise
        call `sync()` later."""
        path = self._to_write(rel)
        if not self.is_local:
            return swap_object(self.fs, path, data, expected)
        self._local_dir(path)
        if not swap_file(path, data, expected, durable=durable):
            return False
        self._written(path, data_too=data is not None and not durable)
        return True

    def sync(self) -> None:
        """Make every write and delete so far durable. Local disks: an fsync of each file written since
        the last sync, then of each directory whose entries changed (new files, renames, deletes, new
        directories), not a sync of every file system on the host; object stores are durable on PUT."""
        if not self.is_local:
            return
        with self._unsynced_lock:
            files, self._unsynced_files = self._unsynced_files, []
            directories, self._unsynced_dirs = self._unsynced_dirs, set()
        # The files and the directories holding their entries: all durable when this returns,
        # in whatever order. fsync waits on the disk without the GIL: issued together, the file
        # system commits them in a few journal transactions rather than one each.
        jobs = [(path, False) for path in dict.fromkeys(files)] + [(path, True) for path in directories]
        if len(jobs) > 1:
            _fsync_together(jobs)
        else:
            for path, directory in jobs:
                _fsync_path(path, directory)

    def _reading(self, rel: str) -> AbstractContextManager[None]:
        """Around a read of `rel`: on an object store, a read that fails (not a missing object) is
        `StoreUnavailable` naming the lake and `rel`; a local disk's errors pass as they are."""
        return nullcontext() if self.is_local else store_reading(self.public_url, rel)

    def read_if_exists(self, rel: str) -> bytes | None:
        try:
            return self.read(rel)
        except FileNotFoundError:
            return None

    def read(self, rel: str) -> bytes:
        path = self._inside(rel)
        if self.is_local:
            return _read_local(rel, path)
        with self._reading(rel):
            return bytes(self.fs.cat_file(path))

    @contextmanager
    def open(self, rel: str) -> Iterator[BinaryIO]:
        """`rel` opened for reading part of it (a parquet footer), held to the checks `read` makes: inside
        the lake, no symbolic link on the way or at the name, a regular file (never waited on)."""
        path = self._inside(rel)
        if self.is_local:
            with _open_local(rel, path) as fh:
                yield fh
            return
        with self._reading(rel), self.fs.open(path, "rb") as handle:
            yield handle

    def exists(self, rel: str) -> bool:
        path = self._inside(rel)
        with self._reading(rel):
            return self.fs.exists(path)

    def size(self, rel: str) -> int | None:
        """The file's size in bytes (no read), or None when it does not exist."""
        path = self._inside(rel)
        try:
            with self._reading(rel):
                return int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def delete(self, rel: str) -> None:
        path = self._inside(rel)
        if self.fs.exists(path):
            self.fs.rm_file(path)
            if self.is_local:
                self._written(path, data_too=False)

    def _relative(self, paths: list[str]) -> list[str]:
        """Lake-relative forms of the paths `fs.find` returned (with or without a protocol; a bucket
        root lists as `bucket/key`)."""
        prefix = self.fs._strip_protocol(self.root).rstrip("/") + "/"
        result = []
        for p in paths:
            p = self.fs._strip_protocol(p)
            if p.startswith(prefix):
                result.append(p[len(prefix) :])
        return sorted(result)

    def _find(self, base: str) -> list[str]:
        """Files below the directory `base` (never a sibling that merely shares its prefix)."""
        inside = self.fs._strip_protocol(base).rstrip("/") + "/"
        try:
            under = base[len(self.root) + 1 :] if base.startswith(self.root + "/") else ""
            with self._reading(f"the listing of {under or 'the lake'}"):
                found = self.fs.find(base)
        except FileNotFoundError:
            return []
        return [p for p in found if self.fs._strip_protocol(p).startswith(inside)]

    def find(self, name: str, under: str = "") -> list[str]:
        """Relative paths of every file called `name` below `under`, sorted."""
        base = self._path(under) if under else self.root
        return [p for p in self._relative(self._find(base)) if p.rsplit("/", 1)[-1] == name]

    def list_files(self, under: str = "") -> list[str]:
        """Relative paths of every file below `under` (the whole lake when empty), sorted."""
        base = self._path(under) if under else self.root
        return self._relative(self._find(base))
