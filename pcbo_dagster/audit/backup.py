"""The local audit backup: one append-only JSON Lines file per chain, written before any delivery.

Layout under the backup directory, for chain_key `<dataset>/<versionLabel>`:

    <dataset>/<versionLabel>.jsonl      one event per line: its RFC 8785 bytes + "\\n"
    <dataset>/<versionLabel>.lock       flock target serialising writers of the chain
    <dataset>/<versionLabel>.delivered  remote delivery cursor, signed with the operator's key when
                                        there is one (see `pcbo_dagster.audit.delivery`)

    <dataset>/<versionLabel>.torn       fragments of torn writes set aside (see below)
    <dataset>/<versionLabel>.checkpoint-delivered   the last checkpoint delivered to the endpoint (a
                                                    note the operator's key signs over its digest)

This is the host-local backup (`PCBO_AUDIT_DIR` a directory). Its interface, `ChainBackup`, is also
implemented on an object store shared by many hosts (`audit.object_store_backup`: one object per
event, written create-only), where a file like this one is only a verified cache.

Lines are only ever appended (O_APPEND, one write per line); no event is ever rewritten.
A crash (or a full disk) in the middle of a write can leave a final fragment without its newline. A
fragment that is a whole event (only the newline is missing) counts as written; any other fragment
was never an event: `last_event` ignores it, and before the next append it is cut off the end of the
file (`remove_torn_tail`) so the chain file holds only whole events again. The audit log does that
while reconciling with the catalog: a fragment of the batch the catalog holds pending is dropped
(the batch is then written whole), any other fragment is set aside, byte for byte, in the chain's
`.torn` file, which `pcbo verify` reports. Lines are parsed strictly: duplicate object keys make a
line unparseable.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pcbo_dagster.core.audit_chain import checked_event_hash, json_problems, split_chain_key
from pcbo_dagster.core.canonical import fast_jcs, jcs
from pcbo_dagster.io.regular_files import NotRegularFile, open_regular, open_regular_fd

_TAIL_BLOCK = 64 * 1024


class AuditBackupCorrupt(ValueError):
    """The backup cannot be appended to safely (its last complete line is not an event)."""


class ChainBackup(Protocol):
    """Where the audit chains are written before anything else (CONTRACT section 6): the host-local
    `AuditBackup`, or `ObjectStoreAuditBackup` on a store every host shares. The audit log, verify,
    rollback, gc, the gates and delivery use only this."""

    #: Where the backup is, as messages show it (no credentials).
    location: str

    def locked(self, chain_key: str) -> AbstractContextManager[None]:
        """The chain's writer lock on this host (across processes and threads; re-entrant)."""
        ...

    def append(self, chain_key: str, events: list[dict], *, fsync: bool = True) -> None:
        """Append events that continue the chain (ValueError and nothing written otherwise)."""
        ...

    def torn_tail(self, chain_key: str) -> bytes | None: ...

    def remove_torn_tail(self, chain_key: str, *, set_aside: bool) -> bytes | None: ...

    def holds_beyond_chain(self, chain_key: str, event: dict) -> bool:
        """True when the backup durably holds exactly `event` (its RFC 8785 bytes) at its seq although
        that seq lies after the chain's contiguous end (a hole before it: an object store's batch cut
        short); False otherwise, always for a file, which has no holes."""
        ...

    def last_event(self, chain_key: str) -> dict | None: ...

    def read_chain(self, chain_key: str) -> list[dict]: ...

    def read_chain_with_problems(self, chain_key: str) -> tuple[list[dict], list[str]]: ...

    def chain_keys(self) -> list[str]: ...

    def read_all_with_problems(self) -> tuple[dict[str, list[dict]], list[str]]:
        """Every chain as the backup holds it, read from its durable copy (never from a cache)."""
        ...

    def read_all(self) -> dict[str, list[dict]]: ...

    def set_aside_fragments(self) -> dict[str, bytes]: ...

    def delivery_locked(self, chain_key: str) -> AbstractContextManager[None]:
        """Held while the chain's events are delivered remotely (see `audit.delivery`)."""
        ...

    def read_delivery_cursor(self, chain_key: str) -> bytes | None:
        """The stored delivery cursor's bytes, or None when nothing was delivered yet."""
        ...

    def write_delivery_cursor(self, chain_key: str, data: bytes) -> None:
        """Replace the delivery cursor, all or nothing."""
        ...

    def read_checkpoint_marker(self, chain_key: str) -> bytes | None:
        """The checkpoint delivery marker's bytes (`engine/transparency_log.py`), or None (none yet)."""
        ...

    def write_checkpoint_marker(self, chain_key: str, data: bytes) -> None:
        """Replace the checkpoint delivery marker, all or nothing."""
        ...


@dataclass(frozen=True)
class ChainPaths:
    """Files of one chain inside the backup directory."""

    directory: Path
    events: Path
    lock: Path
    delivered: Path
    delivery_lock: Path
    torn: Path
    checkpoint_delivered: Path


class _ChainLock:
    """Per-process, per-lock-file state: a re-entrant thread lock plus the flock'ed descriptor."""

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None


_LOCKS: dict[str, _ChainLock] = {}
_LOCKS_GUARD = threading.Lock()


def _replace_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` all or nothing: a temp file beside it, fsync, os.replace, directory
    fsync."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _not_regular(path: Path) -> AuditBackupCorrupt:
    return AuditBackupCorrupt(f"{path} is not a regular file (a FIFO, a device or a directory)")


def read_regular(path: Path) -> bytes:
    """The bytes of a file of the backup; `FileNotFoundError` when there is none, `AuditBackupCorrupt`
    when the name holds no regular file (a FIFO, which a plain read waits on for ever, a device, a
    directory: someone who can write the backup directory planted it)."""
    try:
        with open_regular(str(path)) as file:
            return file.read()
    except NotRegularFile as exc:
        raise _not_regular(path) from exc
    except IsADirectoryError as exc:
        raise _not_regular(path) from exc


def _read_if_present(path: Path) -> bytes | None:
    """`read_regular`, or None when there is no such file (a marker not written yet)."""
    try:
        return read_regular(path)
    except FileNotFoundError:
        return None


def _open_regular(path: Path, flags: int) -> int:
    """`os.open(path, flags)` of a file of the backup, refusing a name that holds no regular file as
    `read_regular` does (a FIFO is opened without waiting, then refused)."""
    try:
        return open_regular_fd(path, flags)
    except NotRegularFile as exc:
        raise _not_regular(path) from exc


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on `path` across processes (fcntl.flock) and threads (a threading.RLock shared
    by every object of this process using the same file). Re-entrant within one thread; blocks."""
    key = os.path.realpath(path)
    with _LOCKS_GUARD:
        state = _LOCKS.setdefault(key, _ChainLock())
    with state.rlock:
        if state.depth == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            state.fd = fd
        state.depth += 1
        try:
            yield
        finally:
            state.depth -= 1
            if state.depth == 0 and state.fd is not None:
                fd, state.fd = state.fd, None
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)


def _final_fragment(fd: int, end: int) -> tuple[int, bytes] | None:
    """What follows the last newline of the first `end` bytes of `fd` (its offset and bytes), or None
    when they are empty or end with a newline: a torn write, or a last event without its newline."""
    if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
        return None
    start = _rfind_newline(fd, end) + 1
    return start, os.pread(fd, end - start, start)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        dupes = sorted({k for k, _ in pairs if sum(1 for k2, _ in pairs if k2 == k) > 1})
        raise ValueError(f"duplicate object keys {dupes}")
    return result


def _parse_line(line: bytes) -> Any:
    """Parse JSON bytes; ValueError (or UnicodeDecodeError) for invalid JSON or duplicate keys."""
    return json.loads(line.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)


def _event_or_none(line: bytes) -> dict | None:
    try:
        event = _parse_line(line)
    except (UnicodeDecodeError, ValueError):
        return None
    chain = event.get("chain") if isinstance(event, dict) else None
    if not isinstance(chain, dict) or not isinstance(chain.get("seq"), int):
        return None
    return event


class AuditBackup:
    """Append-only per-chain JSON Lines files under `directory` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.location = str(self.directory)

    # -- paths and locking -------------------------------------------------------------------

    def paths(self, chain_key: str) -> ChainPaths:
        """The files of `chain_key`; ValueError for a chain_key outside the allowed form."""
        dataset, label = split_chain_key(chain_key)
        folder = self.directory / dataset
        return ChainPaths(
            directory=folder,
            events=folder / f"{label}.jsonl",
            lock=folder / f"{label}.lock",
            delivered=folder / f"{label}.delivered",
            delivery_lock=folder / f"{label}.delivery-lock",
            torn=folder / f"{label}.torn",
            checkpoint_delivered=folder / f"{label}.checkpoint-delivered",
        )

    @contextmanager
    def locked(self, chain_key: str) -> Iterator[None]:
        """Hold the chain's exclusive writer lock (across processes and threads; re-entrant)."""
        with file_lock(self.paths(chain_key).lock):
            yield

    @contextmanager
    def delivery_locked(self, chain_key: str) -> Iterator[None]:
        """The chain's delivery lock (separate from the writer lock: a slow endpoint never blocks appends)."""
        paths = self.paths(chain_key)
        paths.directory.mkdir(parents=True, exist_ok=True)
        with file_lock(paths.delivery_lock):
            yield

    def read_delivery_cursor(self, chain_key: str) -> bytes | None:
        return _read_if_present(self.paths(chain_key).delivered)

    def write_delivery_cursor(self, chain_key: str, data: bytes) -> None:
        """Replace the cursor file atomically (`_replace_file`)."""
        _replace_file(self.paths(chain_key).delivered, data)

    def read_checkpoint_marker(self, chain_key: str) -> bytes | None:
        return _read_if_present(self.paths(chain_key).checkpoint_delivered)

    def write_checkpoint_marker(self, chain_key: str, data: bytes) -> None:
        """Replace the marker file atomically (`_replace_file`)."""
        path = self.paths(chain_key).checkpoint_delivered
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace_file(path, data)

    # -- writing ----------------------------------------------------------------------------

    def append(self, chain_key: str, events: list[dict], *, fsync: bool = True) -> None:
        """Append events to the chain file, each as one line of its JCS bytes.

        Under the chain lock, every event must continue the chain: its chain_key is `chain_key`, its
        seq is the last seq + 1 (0 for an empty file), its prev_event_hash the last event_hash, and
        its stored event_hash recomputes. Otherwise ValueError and nothing is written, so a backup
        never forks.
        """
        paths = self.paths(chain_key)
        if not events:
            return
        lines: list[bytes] = []
        with self.locked(chain_key):
            last = self.last_event(chain_key)
            seq = last["chain"]["seq"] if last else -1
            prev = last["chain"]["event_hash"] if last else None
            for event in events:
                self._check_continues(chain_key, event, seq + 1, prev)
                # Checked: no floats, no large integers (json_problems), so orjson's sorted output is
                # its RFC 8785 form (fast_jcs hands anything non-ASCII to rfc8785).
                lines.append(fast_jcs(event) + b"\n")
                seq, prev = event["chain"]["seq"], event["chain"]["event_hash"]
            paths.directory.mkdir(parents=True, exist_ok=True)
            self.remove_torn_tail(chain_key, set_aside=True)
            created = not paths.events.exists()
            fd = _open_regular(paths.events, os.O_RDWR | os.O_APPEND | os.O_CREAT)
            try:
                if not created and self._ends_torn(fd):
                    # A whole event that only lacks its newline: end its line first.
                    lines[0] = b"\n" + lines[0]
                for line in lines:
                    _write_all(fd, line)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if created and fsync:
                _fsync_dir(paths.directory)

    def holds_beyond_chain(self, chain_key: str, event: dict) -> bool:
        """Always False: one file, appended in order, holds no event after a hole."""
        return False

    def torn_tail(self, chain_key: str) -> bytes | None:
        """The final fragment of the chain file when it is not a whole event (a torn write), else None."""
        path = self.paths(chain_key).events
        try:
            fd = _open_regular(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            final = _final_fragment(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if final is None:
            return None
        return None if _event_or_none(final[1]) is not None else final[1]

    def remove_torn_tail(self, chain_key: str, *, set_aside: bool) -> bytes | None:
        """Cut a torn final fragment (`torn_tail`) off the chain file, first appending it to the
        chain's `.torn` file when `set_aside`; returns the fragment (None when there was none)."""
        paths = self.paths(chain_key)
        with self.locked(chain_key):
            fragment = self.torn_tail(chain_key)
            if fragment is None:
                return None
            if set_aside:
                fd = _open_regular(paths.torn, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                try:
                    _write_all(fd, fragment + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            size = paths.events.stat().st_size
            fd = _open_regular(paths.events, os.O_RDWR)
            try:
                os.ftruncate(fd, size - len(fragment))
                os.fsync(fd)
            finally:
                os.close(fd)
            return fragment

    def set_aside_fragments(self) -> dict[str, bytes]:
        """{chain_key: the bytes of its `.torn` file} for every chain with torn fragments set aside."""
        found: dict[str, bytes] = {}
        for key in self.chain_keys():
            torn = self.paths(key).torn
            if torn.is_file():  # (a name holding anything else is `read_all_with_problems`'s to report)
                found[key] = read_regular(torn)
        return found

    def sync(self, chain_key: str) -> None:
        """fsync the chain file (after appends made with `fsync=False`)."""
        path = self.paths(chain_key).events
        if not path.exists():
            return
        fd = _open_regular(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _ends_torn(fd: int) -> bool:
        size = os.fstat(fd).st_size
        return size > 0 and os.pread(fd, 1, size - 1) != b"\n"

    @staticmethod
    def _check_continues(chain_key: str, event: dict, seq: int, prev: str | None) -> None:
        chain = event.get("chain") if isinstance(event, dict) else None
        if not isinstance(chain, dict):
            raise ValueError("an event must be an object with a `chain` object")
        if chain.get("chain_key") != chain_key:
            raise ValueError(f"event chain_key {chain.get('chain_key')!r} is not {chain_key!r}")
        if chain.get("seq") != seq or isinstance(chain.get("seq"), bool):
            raise ValueError(
                f"{chain_key}: event seq {chain.get('seq')!r} does not continue the chain (expected {seq})"
            )
        if chain.get("prev_event_hash") != prev:
            raise ValueError(f"{chain_key}: event seq {seq} prev_event_hash does not link to the chain head")
        problems = json_problems(event, "event")
        if problems:
            raise ValueError(f"{chain_key}: event seq {seq}: " + "; ".join(problems))
        if chain.get("event_hash") != checked_event_hash(event):
            raise ValueError(f"{chain_key}: event seq {seq}: stored event_hash does not recompute")

    # -- reading ----------------------------------------------------------------------------

    def read_chain_with_problems(self, chain_key: str) -> tuple[list[dict], list[str]]:
        """Events of the chain file in file order, and a description of every unparseable line
        (a final fragment without newline included)."""
        path = self.paths(chain_key).events
        if not path.exists():
            return [], []
        return _read_jsonl(path)

    def read_chain(self, chain_key: str) -> list[dict]:
        """Events of the chain file in file order (unparseable lines are skipped; see
        `read_chain_with_problems`)."""
        return self.read_chain_with_problems(chain_key)[0]

    def last_event(self, chain_key: str) -> dict | None:
        """The last event of the chain, read from the end of the file; None for an empty chain.

        A final fragment without newline that is not an event (a torn write) is ignored; a complete
        event that only lacks its newline counts. AuditBackupCorrupt when the last complete line is
        not an event.
        """
        path = self.paths(chain_key).events
        try:
            fd = _open_regular(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            end = os.fstat(fd).st_size
            final = _final_fragment(fd, end)
            if final is not None:
                tail = _event_or_none(final[1])
                if tail is not None:
                    return tail
                end = final[0]  # drop the torn fragment
            if end == 0:
                return None
            start = _rfind_newline(fd, end - 1) + 1
            line = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
        event = _event_or_none(line)
        if event is None:
            raise AuditBackupCorrupt(f"{path}: the last line is not an audit event")
        return event

    def chain_keys(self) -> list[str]:
        """Chain keys that have a chain file, sorted."""
        keys: list[str] = []
        if not self.directory.is_dir():
            return keys
        for folder in sorted(self.directory.iterdir()):
            if not folder.is_dir():
                continue
            for file in sorted(folder.glob("*.jsonl")):
                key = f"{folder.name}/{file.name[: -len('.jsonl')]}"
                try:
                    split_chain_key(key)
                except ValueError:
                    continue
                keys.append(key)
        return sorted(keys)

    def read_all_with_problems(self) -> tuple[dict[str, list[dict]], list[str]]:
        """Every `.jsonl` (one event a line) and `.json` (one event) file under the directory,
        recursively, grouped by each event's `chain.chain_key`, and a list of problems (unparseable
        lines or files, events without a chain_key).

        Order within a chain: `.jsonl` events in file order (files by path), so that verification
        sees any reordering; then `.json` events sorted by seq (path order for equal seqs). A `.json`
        event byte-identical (JCS) to one already collected for its chain is a copy and is dropped.
        """
        chains: dict[str, list[dict]] = {}
        seen: dict[str, set[bytes]] = {}
        singles: dict[str, list[tuple[Any, str, dict]]] = {}
        problems: list[str] = []
        if not self.directory.is_dir():
            return chains, problems
        entries = sorted(self.directory.rglob("*"))
        for path in entries:  # nothing pcbo writes there is other than a file or a directory
            if not path.is_file() and not path.is_dir():
                rel = path.relative_to(self.directory).as_posix()
                problems.append(
                    f"{rel}: neither a regular file nor a directory (a FIFO, a device, a dangling link): "
                    "not read"
                )
        files = [p for p in entries if p.is_file() and p.suffix in (".jsonl", ".json")]
        for path in files:
            rel = path.relative_to(self.directory).as_posix()
            if path.suffix == ".jsonl":
                try:
                    events, bad = _read_jsonl(path, rel)
                except AuditBackupCorrupt as exc:  # replaced since it was listed
                    problems.append(f"{rel}: {exc}")
                    continue
                problems.extend(bad)
                for index, event in enumerate(events):
                    key = _chain_key_of(event)
                    if key is None:
                        problems.append(f"{rel}: event #{index}: no chain.chain_key string")
                        continue
                    chains.setdefault(key, []).append(event)
                    canonical = _canonical_or_none(event)
                    if canonical is not None:
                        seen.setdefault(key, set()).add(canonical)
            else:
                try:
                    event = _parse_line(read_regular(path))
                except (UnicodeDecodeError, ValueError) as exc:  # (AuditBackupCorrupt too)
                    problems.append(f"{rel}: not a JSON document: {exc}")
                    continue
                key = _chain_key_of(event)
                if key is None:
                    problems.append(f"{rel}: no chain.chain_key string")
                    continue
                singles.setdefault(key, []).append((event["chain"].get("seq"), rel, event))
        for key, items in singles.items():
            items.sort(
                key=lambda item: (
                    not isinstance(item[0], int),
                    item[0] if isinstance(item[0], int) else 0,
                    item[1],
                )
            )
            known = seen.setdefault(key, set())
            for _, _, event in items:
                canon = _canonical_or_none(event)
                if canon is not None:
                    if canon in known:
                        continue
                    known.add(canon)
                chains.setdefault(key, []).append(event)
        return dict(sorted(chains.items())), problems

    def read_all(self) -> dict[str, list[dict]]:
        """`read_all_with_problems()` without the problems."""
        return self.read_all_with_problems()[0]


def _chain_key_of(event: Any) -> str | None:
    chain = event.get("chain") if isinstance(event, dict) else None
    key = chain.get("chain_key") if isinstance(chain, dict) else None
    return key if isinstance(key, str) else None


def _canonical_or_none(event: dict) -> bytes | None:
    try:
        return jcs(event)
    except Exception:  # noqa: BLE001 - uncanonicalizable events are never treated as copies
        return None


def _rfind_newline(fd: int, end: int) -> int:
    """Offset of the last b"\\n" before `end`, or -1."""
    pos = end
    while pos > 0:
        start = max(0, pos - _TAIL_BLOCK)
        block = os.pread(fd, pos - start, start)
        idx = block.rfind(b"\n")
        if idx >= 0:
            return start + idx
        pos = start
    return -1


def _read_jsonl(path: Path, label: str | None = None) -> tuple[list[dict], list[str]]:
    label = label or str(path)
    events: list[dict] = []
    problems: list[str] = []
    lines = read_regular(path).split(b"\n")
    torn_tail = lines[-1] != b""
    if not torn_tail:
        lines.pop()
    for number, line in enumerate(lines, start=1):
        torn = torn_tail and number == len(lines)
        if not line.strip():
            problems.append(f"{label}:{number}: empty line")
            continue
        try:
            event = _parse_line(line)
        except (UnicodeDecodeError, ValueError) as exc:
            kind = "incomplete last line (torn write)" if torn else "unparseable line"
            problems.append(f"{label}:{number}: {kind}: {exc}")
            continue
        if not isinstance(event, dict):
            problems.append(f"{label}:{number}: not a JSON object")
            continue
        events.append(event)
    return events, problems
