"""The audit backup on an object store every host shares: one object per event, written create-only.

With runs on many hosts (each with its own, possibly ephemeral, local disk) a host-local backup file
cannot be the durable copy of a chain: a second host would have its own, and a host that goes away
takes its copy with it. So `PCBO_AUDIT_DIR` may be an `s3://` or `gs://` URL, and then the chain lives
there, beside (or apart from) the lake:

    <url>/<dataset>/<versionLabel>/000000000000.json     the event of seq 0: its RFC 8785 bytes
    <url>/<dataset>/<versionLabel>/000000000001.json     seq 1, ...
    <url>/<dataset>/<versionLabel>/_delivered.json       the remote delivery cursor (not evidence)
    <url>/<dataset>/<versionLabel>/_checkpoint_delivered.json   the last checkpoint delivered (idem;
                                                                 both signed as `audit.backup` says)

Each event object is written **create-only** (S3 `PutObject` with `If-None-Match: *`, GCS
`ifGenerationMatch=0`): the store itself refuses a second object at a seq, so two hosts can never
both write seq N, whatever their locks say. A create that finds an object already there succeeds only
when that object holds exactly the same bytes (a batch a crash cut short, its hole filled from the
catalog's pending copy); any other object there stops the append (`AuditBackupConflict`).

The events of one append are written at once (concurrent PUTs), so a crash can leave a batch with a
hole (seq 5 and 7 written, 6 not). The chain a run reads is therefore the *contiguous* prefix of
objects from seq 0: the audit log (`audit.log`) fills the hole from the catalog's pending copy only
up to the last event of the batch the store holds (`holds_beyond_chain`), whose `prev_event_hash`
pins every event before it; the rest of the batch never reached the store and is dropped. An object
beyond a hole that is not part of that batch is never adopted (its create fails). `verify` reads
every object, so a hole or a stray object is a finding there.

A host-local copy of each chain (`cache_dir`, a JSON Lines file as `audit.backup.AuditBackup` writes
it) saves reading every object again on every run. It is only a cache: it holds nothing the store
does not, every read checks it and drops it at the first disagreement, and it is never read by
`verify`, which reads the store. The check: its chain verifies, hash by hash; its last event is byte
for byte the store's object at that seq; and every object below it is still the object whose bytes the
cache was compared with. For that, beside the cache, the listing's fingerprint of each object the cache
holds (S3's ETag, GCS's generation, MD5 and CRC32C, with the size) is kept once its bytes were compared
with the cached event's; every read lists the chain anyway, and an object rewritten on the store since
(its fingerprint changed) drops the cache, so the store's events are read again and the rewritten one
is found (a process that lives on, `pcbo serve`, sees it at its next read). Objects the cache holds
without a fingerprint (appended since the last read, or listed without one) are fetched and compared.
Writers on one host are serialised by the cache's file lock; writers
on different hosts by the catalog (PostgreSQL's advisory lock and the chain head's row lock, held for
the whole append: `catalog/chain.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from pcbo_dagster.audit.backup import (
    AuditBackup,
    AuditBackupCorrupt,
    ChainBackup,
    _event_or_none,
    _parse_line,
    _replace_file,
    read_regular,
)
from pcbo_dagster.core.audit_chain import split_chain_key, verify_chain
from pcbo_dagster.core.canonical import jcs
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.lake.storage import StoreUnavailable, create_object, filesystem, store_reading

#: Schemes whose stores take create-only writes (the durable, shared audit copy).
SHARED_SCHEMES = ("s3", "s3a", "gs", "gcs")
SEQ_DIGITS = 12
CURSOR_NAME = "_delivered.json"
CHECKPOINT_MARKER_NAME = "_checkpoint_delivered.json"
#: An event object's name: ASCII digits only (`\d` would take any Unicode digit, and int() reads them).
_EVENT_NAME = re.compile(r"([0-9]{12})\.json")
#: The keys of a listing's entry that change when an object's bytes do (s3fs: ETag; gcsfs: the rest).
_FINGERPRINT_KEYS = ("ETag", "generation", "md5Hash", "crc32c")


class AuditBackupConflict(ValueError):
    """The store already holds a different event at a seq an append was about to write."""


def is_shared_store(location: str) -> bool:
    """Whether an audit location is an object-store URL (`s3://`, `gs://`), not a local directory."""
    return "://" in location and location.split("://", 1)[0].lower() in SHARED_SCHEMES


def open_backup(location: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> ChainBackup:
    """The audit backup at `location`: an object store (with its host-local cache under `cache_dir`)
    or a local directory."""
    text = os.fspath(location)
    if is_shared_store(text):
        if cache_dir is None:
            raise ValueError("an object-store audit backup needs a local cache directory")
        return ObjectStoreAuditBackup(text, Path(cache_dir))
    if text.startswith("file://"):
        text = text[len("file://") :]
    return AuditBackup(text)


def event_name(seq: int) -> str:
    """The object name of the event at `seq` (`000000000042.json`)."""
    return f"{seq:0{SEQ_DIGITS}d}.json"


class ObjectStoreAuditBackup:
    """Per-event objects under an `s3://` / `gs://` URL, with a verified local cache (module doc)."""

    def __init__(self, url: str, cache_dir: Path) -> None:
        self.url = url.rstrip("/")
        self.location = redact_url(self.url)
        self.fs, root = filesystem(self.url)
        self.root = self.fs._strip_protocol(root).rstrip("/")
        # One cache per store URL, so one home can serve several stores without mixing them.
        digest = hashlib.sha256(self.location.encode("utf-8")).hexdigest()[:16]
        # (Nothing of the cache is remembered between reads: a process that lives on checks it at
        # every read, as a fresh one does, since the file may have been edited in between.)
        self.cache = AuditBackup(Path(cache_dir) / digest)

    # -- names ------------------------------------------------------------------------------------

    def _chain_dir(self, chain_key: str) -> str:
        dataset, label = split_chain_key(chain_key)
        return f"{self.root}/{dataset}/{label}"

    def _event_path(self, chain_key: str, seq: int) -> str:
        return f"{self._chain_dir(chain_key)}/{event_name(seq)}"

    def _listing(self, chain_key: str) -> dict[int, tuple[str, str | None]]:
        """{seq: (path, fingerprint)} of the chain's event objects, listed now (never from fsspec's
        listing cache); the fingerprint as `_fingerprint` gives it."""
        directory = self._chain_dir(chain_key)
        self.fs.invalidate_cache(directory)
        try:
            with store_reading(self.location, f"the listing of {chain_key}"):
                entries = self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return {}
        found: dict[int, tuple[str, str | None]] = {}
        for entry in entries:
            match = _EVENT_NAME.fullmatch(str(entry.get("name", "")).rsplit("/", 1)[-1])
            if match:
                found[int(match.group(1))] = (f"{directory}/{match.group(0)}", _fingerprint(entry))
        return found

    def _fingerprints_path(self, chain_key: str) -> Path:
        events = self.cache.paths(chain_key).events
        return events.with_name(events.name.removesuffix(".jsonl") + ".objects.json")

    def _pinned(self, chain_key: str) -> list[str | None]:
        """The fingerprint of each object (by seq) whose bytes the cache's event was compared with;
        nothing when the file is missing or not such a list (it is only the cache's)."""
        try:
            value = json.loads(read_regular(self._fingerprints_path(chain_key)))
        except (OSError, ValueError, AuditBackupCorrupt):
            return []
        if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
            return []
        return value

    def _pin(self, chain_key: str, fingerprints: list[str | None]) -> None:
        """Keep `fingerprints` beside the cache (replaced whole, as the backup replaces its files; one
        lost or unreadable reads as none, and the objects are compared again)."""
        data = json.dumps(fingerprints, separators=(",", ":")).encode("ascii")
        _replace_file(self._fingerprints_path(chain_key), data)

    # -- locking ----------------------------------------------------------------------------------

    def locked(self, chain_key: str) -> AbstractContextManager[None]:
        """This host's writer lock of the chain (the cache's file lock); hosts are serialised by the
        catalog's chain lock."""
        return self.cache.locked(chain_key)

    def delivery_locked(self, chain_key: str) -> AbstractContextManager[None]:
        return self.cache.delivery_locked(chain_key)

    # -- reading ----------------------------------------------------------------------------------

    def _fetch(self, paths: list[str]) -> dict[str, bytes | Exception]:
        """The bytes of each path (read at once), or FileNotFoundError in place of an object that is
        not there. A read that failed otherwise (the store down, refusing access, a 5xx after the
        client's retries) raises `StoreUnavailable`: it says nothing of the object, so it is never
        taken for an event that is missing or is not an event (that would report an outage as a
        forged history)."""
        if not paths:
            return {}
        with store_reading(self.location, _shown(paths[0], self.root)):
            got = self.fs.cat(paths, on_error="return")
        if not isinstance(got, dict):  # one path: fsspec returns the bytes themselves
            got = {paths[0]: got}
        out: dict[str, bytes | Exception] = {}
        for path in paths:
            value = got.get(path, got.get(self.fs._strip_protocol(path)))
            if isinstance(value, Exception) and not isinstance(value, FileNotFoundError):
                raise StoreUnavailable(self.location, _shown(path, self.root), value) from value
            out[path] = value if isinstance(value, bytes | Exception) else FileNotFoundError(path)
        return out

    def _drop_cache(self, chain_key: str) -> None:
        self._fingerprints_path(chain_key).unlink(missing_ok=True)
        self.cache.paths(chain_key).events.unlink(missing_ok=True)

    def _verified_cache(
        self, chain_key: str, listing: dict[int, tuple[str, str | None]], contiguous: int
    ) -> tuple[list[dict], list[str | None]]:
        """The cache's events when they are a prefix of the store's chain (checked as the module doc
        says), else nothing (the cache is dropped); and the fingerprints kept beside them."""
        events, problems = self.cache.read_chain_with_problems(chain_key)
        if problems or len(events) > contiguous:
            self._drop_cache(chain_key)
            return [], []
        if not events:
            self._fingerprints_path(chain_key).unlink(missing_ok=True)
            return [], []
        if verify_chain(events, chain_key):
            self._drop_cache(chain_key)
            return [], []
        pinned = self._pinned(chain_key)
        to_compare = {len(events) - 1}  # the last event, always byte for byte
        for seq in range(len(events)):
            fingerprint = listing[seq][1]
            if seq >= len(pinned) or fingerprint is None or pinned[seq] is None:
                to_compare.add(seq)
            elif pinned[seq] != fingerprint:  # rewritten on the store since its bytes were compared
                self._drop_cache(chain_key)
                return [], []
        paths = {seq: listing[seq][0] for seq in sorted(to_compare)}
        fetched = self._fetch(list(paths.values()))
        if any(fetched[path] != jcs(events[seq]) for seq, path in paths.items()):
            self._drop_cache(chain_key)
            return [], []
        return events, pinned

    def _read(self, chain_key: str) -> tuple[list[dict], list[str], int]:
        """(events, problems, number of contiguous objects from seq 0): see `read_chain_with_problems`."""
        with self.cache.locked(chain_key):
            listing = self._listing(chain_key)
            contiguous = 0
            while contiguous in listing:
                contiguous += 1
            events, pinned = self._verified_cache(chain_key, listing, contiguous)
            seqs = range(len(events), contiguous)
            fetched = self._fetch([listing[seq][0] for seq in seqs])
            fresh: list[dict] = []
            problems: list[str] = []
            for seq in seqs:
                path = listing[seq][0]
                data = fetched[path]
                event = _event_or_none(data) if isinstance(data, bytes) else None
                if event is None:
                    problems.append(f"{self.location}: {_shown(path, self.root)}: not an audit event")
                    continue
                if event["chain"].get("seq") != seq:
                    problems.append(
                        f"{self.location}: {_shown(path, self.root)} holds seq {event['chain'].get('seq')!r}"
                    )
                fresh.append(event)
            cached = _continuing(chain_key, events, fresh)
            if cached:
                self.cache.append(chain_key, cached, fsync=False)
            # Every object the cache now holds was compared with its event, as listed then.
            fingerprints = [listing[seq][1] for seq in range(len(events) + len(cached))]
            if fingerprints and fingerprints != pinned:
                self._pin(chain_key, fingerprints)
            if len(cached) < len(fresh) and not problems:
                seq = len(events) + len(cached)
                problems.append(
                    f"{self.location}: {chain_key}: the event at seq {seq} does not continue the chain"
                )
            return events + fresh, problems, contiguous

    def read_chain_with_problems(self, chain_key: str) -> tuple[list[dict], list[str]]:
        """The chain as the store holds it from seq 0 up to its first missing object (a crash may
        leave a hole in the last batch; the objects after one are not read here), and a description
        of every object in that range that is not an event. Only the events the cache lacks are read
        (at once); those that continue the chain are added to the cache."""
        events, problems, _ = self._read(chain_key)
        return events, problems

    def read_chain(self, chain_key: str) -> list[dict]:
        return self._read(chain_key)[0]

    def last_event(self, chain_key: str) -> dict | None:
        """The event of the last contiguous object. `AuditBackupCorrupt` when the chain read from the
        store does not hold together (an object that is not an event, or an event that does not
        continue the one before it): nothing may be appended to it."""
        events, problems, contiguous = self._read(chain_key)
        if problems:
            raise AuditBackupCorrupt(problems[0])
        if contiguous == 0:
            return None
        return events[-1]

    def chain_keys(self) -> list[str]:
        """Chain keys that have at least one event object, sorted."""
        return sorted({key for key, _ in self._objects() if key is not None})

    def _objects(self) -> Iterator[tuple[str | None, str]]:
        """(chain_key or None when the path is no chain's, path) of every object under the URL."""
        self.fs.invalidate_cache(self.root)
        try:
            with store_reading(self.location, "its listing"):
                found = self.fs.find(self.root)
        except FileNotFoundError:
            return
        prefix = self.root + "/"
        for path in sorted(self.fs._strip_protocol(p) for p in found):
            rel = path[len(prefix) :] if path.startswith(prefix) else path
            parts = rel.split("/")
            key = None
            if len(parts) == 3:
                try:
                    split_chain_key(f"{parts[0]}/{parts[1]}")
                    key = f"{parts[0]}/{parts[1]}"
                except ValueError:
                    key = None
            yield key, path

    def read_all_with_problems(self) -> tuple[dict[str, list[dict]], list[str]]:
        """Every chain read from the store (every object; the cache plays no part), in seq order by
        name, holes and strays included (`verify_chain` then reports them), and a description of each
        object that is not an event of its chain."""
        chains: dict[str, list[tuple[int, str]]] = {}
        problems: list[str] = []
        for key, path in self._objects():
            name = path.rsplit("/", 1)[-1]
            match = _EVENT_NAME.fullmatch(name)
            if key is None or (match is None and name not in (CURSOR_NAME, CHECKPOINT_MARKER_NAME)):
                problems.append(f"{self.location}: {_shown(path, self.root)}: not an audit event object")
                continue
            if match is not None:
                chains.setdefault(key, []).append((int(match.group(1)), path))
        result: dict[str, list[dict]] = {}
        for key, named in sorted(chains.items()):
            named.sort()
            fetched = self._fetch([path for _, path in named])
            events: list[dict] = []
            for seq, path in named:
                data = fetched[path]
                shown = _shown(path, self.root)
                try:
                    if not isinstance(data, bytes):
                        raise ValueError(f"cannot be read: {data}")
                    event: Any = _parse_line(data)
                except (UnicodeDecodeError, ValueError) as exc:
                    problems.append(f"{self.location}: {shown}: not a JSON document: {exc}")
                    continue
                chain = event.get("chain") if isinstance(event, dict) else None
                if not isinstance(chain, dict):
                    problems.append(f"{self.location}: {shown}: no chain object")
                    continue
                if chain.get("seq") != seq or chain.get("chain_key") != key:
                    problems.append(
                        f"{self.location}: {shown}: holds {chain.get('chain_key')!r} seq {chain.get('seq')!r}"
                    )
                events.append(event)
            result[key] = events
        return result, problems

    def read_all(self) -> dict[str, list[dict]]:
        return self.read_all_with_problems()[0]

    # -- writing ----------------------------------------------------------------------------------

    def append(self, chain_key: str, events: list[dict], *, fsync: bool = True) -> None:
        """Write events that continue the chain, each create-only (module doc); then add them to the
        cache. ValueError (nothing written) when they do not continue the chain; `AuditBackupConflict`
        when the store already holds a different event at one of their seqs. Every PUT is durable
        when it returns (`fsync` has nothing more to do)."""
        if not events:
            return
        with self.cache.locked(chain_key):
            current = self.read_chain(chain_key)
            seq = current[-1]["chain"]["seq"] if current else -1
            prev = current[-1]["chain"]["event_hash"] if current else None
            for event in events:
                AuditBackup._check_continues(chain_key, event, seq + 1, prev)
                seq, prev = event["chain"]["seq"], event["chain"]["event_hash"]
            self._create_all(chain_key, events)
            self.cache.append(chain_key, events, fsync=False)

    def _create_all(self, chain_key: str, events: list[dict]) -> None:
        payload = {self._event_path(chain_key, e["chain"]["seq"]): jcs(e) for e in events}
        try:
            self.fs.pipe(payload, mode="create")
            return
        except FileExistsError:
            pass
        for path, data in payload.items():  # one of them exists: which, and is it this very event?
            if not create_object(self.fs, path, data):
                held = self._fetch([path])[path]
                if held != data:
                    raise AuditBackupConflict(
                        f"{self.location}: {_shown(path, self.root)} already holds a different event: "
                        "another writer appended to the chain at this seq; nothing is overwritten"
                    ) from None

    def holds_beyond_chain(self, chain_key: str, event: dict) -> bool:
        """True when the store's object at `event`'s seq is byte for byte `event` (read from the store,
        not the cache); False when there is none. A read that fails is raised, never taken for "not
        held": the pending batch would be dropped though the store may hold its events."""
        path = self._event_path(chain_key, int(event["chain"]["seq"]))
        held = self._fetch([path])[path]
        if isinstance(held, FileNotFoundError):
            return False
        if isinstance(held, Exception):
            raise held
        return held == jcs(event)

    def torn_tail(self, chain_key: str) -> bytes | None:
        """None: every object is written whole by one PUT (a crash leaves a hole, never a fragment)."""
        return None

    def remove_torn_tail(self, chain_key: str, *, set_aside: bool) -> bytes | None:
        return None

    def set_aside_fragments(self) -> dict[str, bytes]:
        return {}

    # -- delivery cursor --------------------------------------------------------------------------

    def _read_marker(self, chain_key: str, name: str) -> bytes | None:
        path = f"{self._chain_dir(chain_key)}/{name}"
        held = self._fetch([path])[path]
        if isinstance(held, FileNotFoundError):
            return None
        if isinstance(held, Exception):
            raise held
        return held

    def read_delivery_cursor(self, chain_key: str) -> bytes | None:
        return self._read_marker(chain_key, CURSOR_NAME)

    def write_delivery_cursor(self, chain_key: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self._chain_dir(chain_key)}/{CURSOR_NAME}", data)

    def read_checkpoint_marker(self, chain_key: str) -> bytes | None:
        return self._read_marker(chain_key, CHECKPOINT_MARKER_NAME)

    def write_checkpoint_marker(self, chain_key: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self._chain_dir(chain_key)}/{CHECKPOINT_MARKER_NAME}", data)


def _fingerprint(entry: dict[str, Any]) -> str | None:
    """What a listing says of an object's bytes (S3's ETag; GCS's generation, MD5 and CRC32C), with its
    size; None when it says none of them (the object is then compared byte for byte at every read)."""
    found = [f"{key}={entry[key]}" for key in _FINGERPRINT_KEYS if entry.get(key) not in (None, "")]
    return ";".join([f"size={entry.get('size')}", *found]) if found else None


def _continuing(chain_key: str, known: list[dict], fresh: list[dict]) -> list[dict]:
    """The longest prefix of `fresh` whose events continue the chain `known` (seq, link, hash)."""
    seq = known[-1]["chain"]["seq"] if known else -1
    prev = known[-1]["chain"]["event_hash"] if known else None
    good: list[dict] = []
    for event in fresh:
        try:
            AuditBackup._check_continues(chain_key, event, seq + 1, prev)
        except ValueError:
            break
        good.append(event)
        seq, prev = event["chain"]["seq"], event["chain"]["event_hash"]
    return good


def _shown(path: str, root: str) -> str:
    return path[len(root) + 1 :] if path.startswith(root + "/") else path
