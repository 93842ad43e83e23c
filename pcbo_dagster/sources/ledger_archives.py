"""Ledger archives in the SEP-54 ("Galexie") layout, read as one JSON-able record per ledger.

Layout under an archive's ledgers path (a local directory, or any fsspec URL such as `s3://...`):

    <%08X--pStart-pEnd>/<%08X--start[-end]>.xdr.zst     (older archives: `.xdr.zstd`)

The hex prefix is 0xFFFFFFFF minus the (partition or batch) start, so newer ledgers list first. A
batch file without `-end` holds one ledger. Archives written with one file per partition have no
partition folders: their batch files sit directly under the ledgers path; both forms are read.
Dot files (SEP-54's `.config.json`) and an object store's folder markers (`arch/`) are ignored;
any other name that does not follow the layout is refused, naming it.

Each batch file is a zstd stream of one XDR `LedgerCloseMetaBatch{startSequence, endSequence,
ledgerCloseMetas<>}` (`ledger_decoding`). Every ledger of a batch is walked by a skipping XDR
walker (`ledger_xdr`): the whole LedgerCloseMeta is checked as stellar-sdk's decoder would check it,
but only the header, the transaction set's envelope and operation counts and where each
transaction's result lies are read, and nothing is built; its own `LedgerCloseMeta` bytes are kept
exactly as stored (sliced from the batch, not re-encoded). Large reads are decoded by worker
processes (`ledger_workers()`), in order.

`iter_ledger_records(uri, first, end)` yields, for the ledgers in [first, end) in ledger order:

    {"id": "ledger-<seq, 10 digits>", "ledgerSequence", "occurredAt" (close time, an instant),
     "ledgerHash", "previousLedgerHash" (hex), "protocolVersion", "transactionCount",
     "operationCount", "lcmXdrBase64", "lcmXdrSha256" ("sha256:<hex>"), "consentGranted": true}

Counts are over the ledger's transaction set (successful and failed transactions alike): the
`TransactionSet` of a v0 meta, every phase of the `GeneralizedTransactionSet` of a v1/v2 meta
(classic components and Soroban parallel stages). Operations are counted from the envelopes; a fee
bump counts the operations of its inner transaction.

Batch files are chosen by their names alone (files and partition folders outside the range are
never opened) and read in order, a few at a time (up to two per worker process in flight), so
memory holds a few decompressed batches. Checks, each an `InvalidInput` naming the file: the name's range
against the batch's startSequence/endSequence and against the ledgers inside (one per sequence, in
order), a corrupt zstd stream or XDR, trailing bytes, overlapping batch files, each ledger's
hash against the SHA-256 of its header XDR, and its transaction set and results against the hashes
its header names (`scpValue.txSetHash`, `txSetResultHash`). As a streamed source (`LedgerArchiveSource`) each
ledger is walked once: pass 1 keeps where it lies, and the records a partition writes are sliced
from their batch files again. Its batches and fetched records come as `DigestedRecords`: each
record's RFC 8785 SHA-256 (the plan hash's entry, and what a record read again is compared with) is
computed with its decoding, by the worker processes (`ledger_decoding.with_record_digest`).
"""

from __future__ import annotations

import array
import fcntl
import itertools
import multiprocessing
import os
import posixpath
import re
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pcbo_dagster.core.canonical import DigestedRecords
from pcbo_dagster.core.errors import InvalidInput, PcboError
from pcbo_dagster.core.recorded_text import utf8_shown
from pcbo_dagster.io.env_vars import positive_int
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.sources.ledger_decoding import (
    BatchError,
    BatchResult,
    DecodedLedger,
    Location,
    decode_batch_file,
    ledger_record,
    slice_batch_file,
)
from pcbo_dagster.sources.local_files import REASONS, SourcesDirectory, place_in_sources
from pcbo_dagster.sources.streaming import RecordSource

MAX_UINT32 = 0xFFFFFFFF
_NUMBER = r"(0|[1-9][0-9]{0,9})"  # decimal as Go's %d writes it: no sign, no leading zeros
_PARTITION_RE = re.compile(rf"^(?P<hex>[0-9A-F]{{8}})--(?P<start>{_NUMBER})-(?P<end>{_NUMBER})$")
_BATCH_RE = re.compile(
    rf"^(?P<hex>[0-9A-F]{{8}})--(?P<start>{_NUMBER})(?:-(?P<end>{_NUMBER}))?(?P<suffix>\.xdr\.zstd?)$"
)


class LedgerArchiveError(InvalidInput):
    """A ledger archive that cannot be read as SEP-54: `path` names the folder or file at fault."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path  # a name that is not UTF-8 (a local file system lists one) shown escaped
        super().__init__("source", f"{utf8_shown(path)}: {message}")


@dataclass(frozen=True)
class KeyRange:
    """A parsed partition folder or batch file name: ledgers `start`..`end`, both inclusive."""

    name: str
    start: int
    end: int
    suffix: str = ""  # batch files only: ".xdr.zst" or ".xdr.zstd"

    def intersects(self, first: int, end: int) -> bool:
        """Whether any ledger of this key lies in [first, end)."""
        return self.start < end and self.end >= first


@dataclass(frozen=True)
class BatchFile:
    uri: str  # what fsspec opens: a local path, or a URL with its protocol
    key: KeyRange

    @property
    def start(self) -> int:
        return self.key.start

    @property
    def end(self) -> int:
        return self.key.end


def _parse(regex: re.Pattern[str], name: str, what: str, where: str | None) -> KeyRange:
    where = where or name
    match = regex.match(name)
    if match is None:
        example = "FFFFFFFD--2-65" if what == "partition folder" else "FFFFFFFD--2-65.xdr.zst"
        raise LedgerArchiveError(where, f"not a SEP-54 {what} name (expected e.g. {example})")
    start = int(match["start"])
    end = start if match["end"] is None else int(match["end"])
    if start > MAX_UINT32 or end > MAX_UINT32:
        raise LedgerArchiveError(where, "ledger sequences are 32-bit (at most 4294967295)")
    if end < start:
        raise LedgerArchiveError(where, f"the range ends ({end}) before it starts ({start})")
    expected = f"{MAX_UINT32 - start:08X}"
    if match["hex"] != expected:
        raise LedgerArchiveError(
            where, f"the prefix {match['hex']} should be {expected} (0xFFFFFFFF minus the start {start})"
        )
    return KeyRange(name, start, end, match.groupdict().get("suffix") or "")


def parse_partition_name(name: str, where: str | None = None) -> KeyRange:
    """`FFFFFFFD--2-65` -> KeyRange(start=2, end=65); `LedgerArchiveError` (naming `where`, default
    the name) when malformed."""
    return _parse(_PARTITION_RE, name, "partition folder", where)


def parse_batch_name(name: str, where: str | None = None) -> KeyRange:
    """`FFFFFFFD--2-3.xdr.zst` -> (2, 3); `FFFFFFFD--2.xdr.zstd` -> (2, 2); refuses malformed names."""
    return _parse(_BATCH_RE, name, "batch file", where)


def partition_name(start: int, end: int) -> str:
    return f"{MAX_UINT32 - start:08X}--{start}-{end}"


def batch_name(start: int, end: int, suffix: str = ".xdr.zst") -> str:
    tail = "" if start == end else f"-{end}"
    return f"{MAX_UINT32 - start:08X}--{start}{tail}{suffix}"


def _check_range(first: int, end: int) -> None:
    if not (0 <= first < end <= MAX_UINT32 + 1):
        raise InvalidInput("ledgerRange", f"[{first}, {end}) is not a non-empty range of 32-bit ledgers")


def _listing(fs: Any, path: str, display: str) -> list[dict[str, Any]]:
    """The entries of the folder `path`, but its own marker: on an object store a zero-byte object
    named after the folder (`arch/`, written by a console's "create folder" and many copy tools) is
    listed as a file in it, and is no file of the archive."""
    try:
        entries = list(fs.ls(path, detail=True))
    except FileNotFoundError:
        raise LedgerArchiveError(display, "no such archive folder") from None
    except NotADirectoryError:
        raise LedgerArchiveError(display, "not a folder") from None
    except OSError as exc:
        raise LedgerArchiveError(display, f"cannot be listed: {exc.__class__.__name__}") from None
    folder = path.rstrip("/")
    return [e for e in entries if not (str(e["name"]).rstrip("/") == folder and e.get("type") == "file")]


def _basename(entry: dict[str, Any]) -> str:
    return posixpath.basename(str(entry["name"]).rstrip("/"))


def list_batch_files(
    uri: str, first: int, end: int, confine_to: SourcesDirectory | None = None
) -> list[BatchFile]:
    """The batch files of the archive at `uri` holding any ledger of [first, end), by their names
    alone, in ledger order. Partition folders outside the range are not even listed. An object store
    is reached as a lake is (`lake.storage.filesystem`: its endpoint, and no listing kept for later,
    so a long-lived process sees the archive as it is now). With `confine_to` (a server's sources
    directory), a partition folder that is a symbolic link must lead inside it before it is listed."""
    from pcbo_dagster.lake.storage import filesystem  # here: it loads pyarrow

    _check_range(first, end)
    fs, root = filesystem(uri)
    batches: list[BatchFile] = []

    def add_file(entry: dict[str, Any], inside: KeyRange | None) -> None:
        where = _uri(fs, entry["name"])
        key = parse_batch_name(_basename(entry), where)
        # A FIFO or a device would block a reader or never end (a link to a file is read as the file is;
        # a server's reads are confined when the file is opened: `sources/local_files.py`).
        if entry.get("type") != "file" and not (entry.get("islink") and fs.isfile(entry["name"])):
            raise LedgerArchiveError(where, "not a regular file")
        if inside is not None and not (inside.start <= key.start and key.end <= inside.end):
            raise LedgerArchiveError(
                where,
                f"holds ledgers {key.start}-{key.end}, outside its partition {inside.start}-{inside.end}",
            )
        if key.intersects(first, end):
            batches.append(BatchFile(_uri(fs, entry["name"]), key))

    for entry in _listing(fs, root, uri):
        name = _basename(entry)
        if name.startswith("."):
            continue
        # A partition folder that is a symbolic link is read as the folder it leads to (as a linked
        # batch file is read as its file; a server confines each batch file as it opens it).
        linked = bool(entry.get("islink")) and fs.isdir(entry["name"])
        if entry.get("type") == "directory" or linked:
            part = parse_partition_name(name, _uri(fs, entry["name"]))
            if not part.intersects(first, end):
                continue
            place = None
            if linked and confine_to is not None:
                place = place_in_sources(os.path.realpath(entry["name"]), confine_to)
            if place is not None:
                raise LedgerArchiveError(_uri(fs, entry["name"]), REASONS[place])
            for inner in _listing(fs, entry["name"], _uri(fs, entry["name"])):
                if _basename(inner).startswith("."):
                    continue
                if inner.get("type") == "directory":
                    raise LedgerArchiveError(_uri(fs, inner["name"]), "a folder inside a partition folder")
                add_file(inner, part)
        else:
            add_file(entry, None)
    batches.sort(key=lambda b: (b.start, b.end, b.uri))
    for before, after in zip(batches, batches[1:], strict=False):
        if after.start <= before.end:
            raise LedgerArchiveError(
                after.uri, f"overlaps {before.uri} (ledgers {before.start}-{before.end})"
            )
    return batches


def _uri(fs: Any, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


# -- reading ledgers ------------------------------------------------------------------------------


def ledger_workers() -> int:
    """Processes that decode batch files at once (`PCBO_LEDGER_WORKERS`; default: the CPUs this
    process may run on, at most 4). 1 decodes in the calling process."""
    default = min(
        4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    return positive_int("PCBO_LEDGER_WORKERS", os.environ.get("PCBO_LEDGER_WORKERS"), default)


#: Reads of fewer ledgers than this are decoded in the calling process (starting workers costs more).
POOL_MIN_LEDGERS = 64

#: The bytes the pipe carrying the decoding processes' results may hold (Linux's `F_SETPIPE_SZ`; the
#: default, 64 KiB, had the thread receiving them read each ~620 KB ledger in ten pieces, each one a
#: handover of the GIL from the threads doing the run's work). Issue 18: 2,048 realistic ledgers in
#: 16.2 s against 18.0 s, medians of 5 alternated pairs, every pair faster.
RESULT_PIPE_BYTES = 1 << 20


def _widen_result_pipe(executor: ProcessPoolExecutor) -> None:
    """Best effort: widen the pipe `executor`'s processes send their results through to
    `RESULT_PIPE_BYTES`. Where that cannot be done (not Linux, a system whose `fs.pipe-max-size` is
    lower, an executor laid out otherwise than CPython 3.11's) the pipe stays as it is: results arrive
    all the same, in more pieces."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    reader = getattr(getattr(executor, "_result_queue", None), "_reader", None)
    if set_size is None or reader is None:
        return
    try:
        fcntl.fcntl(reader.fileno(), set_size, RESULT_PIPE_BYTES)
    except (OSError, ValueError, AttributeError):
        pass


class DecodingProcessDied(PcboError):
    """A worker process ended while it decoded a batch file (exit status 1): killed by the system
    (out of memory) or by hand. The pool is started anew by the next read."""

    def __init__(self, uri: str) -> None:
        super().__init__(
            f"{uri}: its reading stopped: a ledger decoding process ended abruptly (killed, perhaps "
            "for lack of memory: PCBO_LEDGER_WORKERS and PCBO_MAX_BATCH_BYTES bound what decoding holds)"
        )


class DecodingPool:
    """Worker processes decoding batch files (`ledger_decoding`), started on first use and kept until
    `close` (or until the pool is garbage). Decoding holds the GIL, so threads would not run it at
    once; processes do, and send back each ledger's fields and base64 XDR. Safe to share between
    threads."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                context = multiprocessing.get_context("spawn")  # never fork a process that has threads
                self._executor = ProcessPoolExecutor(self.workers, mp_context=context)
                weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
                _widen_result_pipe(self._executor)
            return self._executor

    def map(
        self, fn: Callable[..., BatchResult], tasks: list[tuple[Any, ...]], ledgers: int
    ) -> Iterator[BatchResult]:
        """`fn(*task)` of each task, in order: in this process when there is one worker or the work is
        small (`ledgers` in all), else in the workers, up to two tasks a worker in flight. A worker
        that dies (the OOM killer) stops the reading with `DecodingProcessDied` naming the task's
        file (its first item), never a wait."""
        if self.workers <= 1 or ledgers < POOL_MIN_LEDGERS or len(tasks) < 2:
            return (fn(*task) for task in tasks)
        return self._in_workers(fn, tasks)

    def _in_workers(
        self, fn: Callable[..., BatchResult], tasks: list[tuple[Any, ...]]
    ) -> Iterator[BatchResult]:
        executor = self.executor()
        pending: deque[tuple[Future[BatchResult], Any]] = deque()
        queued = iter(tasks)

        def died(uri: Any) -> DecodingProcessDied:
            self._discard(executor)
            return DecodingProcessDied(str(uri))

        def submit(task: tuple[Any, ...]) -> None:
            try:  # a pool already found broken (a worker died since) refuses new work at once
                pending.append((executor.submit(fn, *task), task[0]))
            except BrokenProcessPool:
                raise died(task[0]) from None

        try:
            for task in itertools.islice(queued, 2 * self.workers):
                submit(task)
            while pending:
                future, uri = pending.popleft()
                try:
                    result = future.result()
                except BrokenProcessPool:
                    raise died(uri) from None
                for task in itertools.islice(queued, 1):
                    submit(task)
                yield result
        finally:
            for future, _ in pending:
                future.cancel()

    def _discard(self, broken: ProcessPoolExecutor) -> None:
        """Forget a broken executor (its processes are gone or being ended), so a later read starts a
        new one."""
        with self._lock:
            if self._executor is broken:
                self._executor = None
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None


def _raise(error: BatchError) -> None:
    raise LedgerArchiveError(error.path, error.message)


def _iter_decoded(
    uri: str,
    first: int,
    end: int,
    require_complete: bool,
    pool: DecodingPool,
    gaps: list[tuple[int, int]] | None = None,
    root: SourcesDirectory | None = None,
) -> Iterator[tuple[BatchFile, DecodedLedger, dict[str, Any]]]:
    """(batch file, decoded ledger, record) for the ledgers of [first, end), in ledger order, after
    the checks of `iter_ledger_records`; without `require_complete`, each run of missing ledgers is
    added to `gaps` (when given) as (first, last)."""
    expected = first
    previous: dict[str, Any] | None = None
    batches = list_batch_files(uri, first, end, root)
    tasks = [(b.uri, b.start, b.end, first, end, root) for b in batches]
    ledgers = sum(min(b.end + 1, end) - max(b.start, first) for b in batches)
    for batch, (decoded, error) in zip(batches, pool.map(decode_batch_file, tasks, ledgers), strict=True):
        # A gap is noticed here, by the batch names alone, before the batch is read (its ledgers may
        # have been decoded ahead by a worker, but nothing of them is yielded).
        if batch.start > expected:
            _gap(uri, expected, batch.start - 1, require_complete, gaps)
        for ledger in decoded:
            record = ledger_record(ledger)
            sequence = ledger.sequence
            if previous is not None and previous["ledgerSequence"] == sequence - 1:
                if record["previousLedgerHash"] != previous["ledgerHash"]:
                    raise LedgerArchiveError(
                        batch.uri,
                        f"ledger {sequence}: previousLedgerHash does not match ledger {sequence - 1}'s hash",
                    )
            previous = record
            expected = sequence + 1
            yield batch, ledger, record
        if error is not None:
            _raise(error)
    if expected < end:
        _gap(uri, expected, end - 1, require_complete, gaps)


class TrustedHash(NamedTuple):
    """A ledger's hash the operator trusts, where it came from: `field` is what an archive that holds
    another hash is refused on (`source.trustedLedger.hash` when the request gave it, `source.uri`
    when a Horizon said it), `said_by` who said it, as an error names it."""

    sequence: int
    hash: str
    field: str
    said_by: str


@contextmanager
def _named_as_given(uri: str, shown: str) -> Iterator[None]:
    """An error reading the archive at `uri` names its files as the request gave the archive
    (`shown`, without credentials), not as resolved: a relative `source.uri` resolves into a server's
    sources directory, whose absolute path no client is told."""
    try:
        yield
    except PcboError as exc:
        root, given = uri.rstrip("/"), redact_url(shown).rstrip("/")
        if root and root != given:
            exc.args = tuple(a.replace(root, given) if isinstance(a, str) else a for a in exc.args)
            for name in ("message", "path"):
                value = getattr(exc, name, None)
                if isinstance(value, str):
                    setattr(exc, name, value.replace(root, given))
        raise


def _check_trusted(shown: str, record: dict[str, Any], trusted: TrustedHash) -> None:
    """The trusted ledger's hash in the archive must be the one the operator trusts."""
    if record["ledgerHash"] != trusted.hash:
        raise InvalidInput(
            trusted.field,
            f"{redact_url(shown)}: ledger {trusted.sequence}'s hash is {record['ledgerHash']}, not "
            f"{trusted.said_by} {trusted.hash}: the archive is not that ledger history (nothing written)",
        )


def _check_anchored(sequence: int, seen: bool, gaps: list[tuple[int, int]]) -> None:
    """Every ledger read links to the trusted ledger: it was read, and no gap lies before it (the
    ledgers read link to one another, `_iter_decoded`; a gap links nothing)."""
    if not seen:  # (without allowGaps a missing ledger is refused before this, as a gap)
        raise InvalidInput(
            "source.trustedLedger", f"the archive does not hold ledger {sequence} (nothing written)"
        )
    if gaps:
        low, high = gaps[0]
        raise InvalidInput(
            "source.trustedLedger",
            f"ledgers {low}-{high} are missing from the archive: the ledgers before them cannot be "
            f"linked to the trusted ledger {sequence} (nothing written)",
        )


def _gap(uri: str, low: int, high: int, refuse: bool, gaps: list[tuple[int, int]] | None) -> None:
    if refuse:
        raise LedgerArchiveError(
            uri,
            f"ledgers {low}-{high} are missing from the archive "
            "(set source.allowGaps to load the range with its gaps recorded)",
        )
    if gaps is not None:
        gaps.append((low, high))


def iter_ledger_records(
    uri: str, first: int, end: int, *, require_complete: bool = False, pool: DecodingPool | None = None
) -> Iterator[dict[str, Any]]:
    """One record per ledger of [first, end) held by the archive at `uri`, in ledger order. Batch
    files are decoded in order, by `pool`'s worker processes when the range is large (a pool of
    `ledger_workers()` for this call alone when none is given), else one at a time in this process.
    A batch cut by the range yields only its ledgers inside the range. With `require_complete`, a
    ledger of the range missing from the archive is an error; consecutive ledgers must always chain
    (previousLedgerHash = the previous ledger's hash). Without it, a missing batch file is a gap no
    one notices: its ledgers are simply not yielded."""
    own = pool is None
    pool = pool or DecodingPool(ledger_workers())
    try:
        for _, _, record in _iter_decoded(uri, first, end, require_complete, pool):
            yield record
    finally:
        if own:
            pool.close()


#: A batch of ledger records also ends once it holds this many bytes of ledger XDR (ledgers are large).
LEDGER_BATCH_BYTES = 64 << 20


class LedgerIndex:
    """Where pass 1 found each ledger it read (its batch file, bytes in the decompressed batch, the
    offset of its header) and what walking it gave (transaction and operation counts, the SHA-256
    of its XDR): 68 bytes a ledger (and each batch file once), so that a ledger read again is sliced
    from its batch, not walked again."""

    def __init__(self) -> None:
        self.files: list[BatchFile] = []
        self.sequences = array.array("q")
        self.file_of = array.array("i")
        self.offsets = array.array("q")
        self.lengths = array.array("i")
        self.header_offsets = array.array("i")
        self.transactions = array.array("i")
        self.operations = array.array("i")
        self.digests = bytearray()

    def add(self, batch: BatchFile, ledger: DecodedLedger) -> None:
        if not self.files or self.files[-1] is not batch:
            self.files.append(batch)
        self.sequences.append(ledger.sequence)  # in ledger order: pass 1 reads the archive in order
        self.file_of.append(len(self.files) - 1)
        self.offsets.append(ledger.offset)
        self.lengths.append(ledger.length)
        self.header_offsets.append(ledger.header_offset)
        self.transactions.append(ledger.transaction_count)
        self.operations.append(ledger.operation_count)
        self.digests += ledger.xdr_sha256

    def positions(self, sequences: np.ndarray) -> np.ndarray | None:
        """The index position of each sequence; None if any was not read in pass 1."""
        known = (
            np.frombuffer(self.sequences, dtype=np.int64) if len(self.sequences) else np.empty(0, np.int64)
        )
        at = np.searchsorted(known, sequences)
        if (
            not len(known)
            or (at >= len(known)).any()
            or (known[np.minimum(at, len(known) - 1)] != sequences).any()
        ):
            return None
        return at

    def location(self, k: int) -> Location:
        return (
            self.sequences[k], self.offsets[k], self.lengths[k], self.header_offsets[k],
            self.transactions[k], self.operations[k], bytes(self.digests[32 * k : 32 * k + 32]),
        )  # fmt: skip


class LedgerArchiveSource(RecordSource):
    """The ledgers [first, end) of an archive as a streamed source (`engine.request_loading`): read in
    batches of up to `size` ledgers or `LEDGER_BATCH_BYTES` of XDR, a record's locator its ledger
    sequence. Pass 1 (`batches`) walks every ledger once and keeps a `LedgerIndex`; `fetch` reads the
    batch files of the sequences asked for again and slices their ledgers out (the bytes must be
    those of pass 1), without walking them again. Both decode in `ledger_workers()` processes when
    there is enough to read."""

    kind = "ledger_archive"

    def __init__(
        self,
        uri: str,
        shown: str,
        first: int,
        end: int,
        allow_gaps: bool = False,
        trusted: tuple[int, str] | None = None,
    ) -> None:
        super().__init__(uri, shown)
        self.first, self.end = first, end
        self.allow_gaps = allow_gaps
        #: (sequence, hash) of the ledger the operator trusts (`source.trustedLedger`, else, when
        #: `PCBO_TRUSTED_HORIZON_URL` is set, the range's last ledger as that Horizon says it, asked
        #: by pass 1): pass 1 refuses the archive unless that ledger has that hash and every ledger
        #: before it links to it.
        self.given_trusted = trusted
        self.trusted: TrustedHash | None = None
        #: The runs of ledgers of the range the archive does not hold (with `allow_gaps`), as
        #: (first, last), after `batches`; without `allow_gaps` a gap is invalid input.
        self.gaps: list[tuple[int, int]] = []
        self.index: LedgerIndex | None = None
        self.pool = DecodingPool(ledger_workers())

    def where(self, locator: int) -> str:
        return f"{redact_url(self.shown)}, ledger {locator}"

    def batches(self, size: int) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        with _named_as_given(self.uri, self.shown):
            yield from self._batches(size)

    def _batches(self, size: int) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        records: list[Any] = []
        held = 0
        self.count = 0
        index = LedgerIndex()
        self.gaps = []
        self.trusted = (
            TrustedHash(*self.given_trusted, "source.trustedLedger.hash", "the trusted")
            if self.given_trusted
            else self._ask_trusted_horizon()
        )
        decoded = _iter_decoded(
            self.uri, self.first, self.end, not self.allow_gaps, self.pool, self.gaps, self.root
        )
        digests: list[bytes] = []  # of the records, computed by the decoding (`with_record_digest`)

        def batch() -> tuple[list[Any], bool, np.ndarray]:
            sequences = np.array([r["ledgerSequence"] for r in records], dtype=np.int64)
            return DigestedRecords(records, b"".join(digests)), False, sequences

        anchored = False
        for file, ledger, record in decoded:
            if self.trusted is not None and ledger.sequence == self.trusted.sequence:
                _check_trusted(self.shown, record, self.trusted)
                anchored = True
            index.add(file, ledger)
            records.append(record)
            digests.append(ledger.record_sha256)
            held += len(record["lcmXdrBase64"])
            if len(records) >= size or held >= LEDGER_BATCH_BYTES:
                self.count += len(records)
                yield batch()
                records, digests, held = [], [], 0
        if self.trusted is not None:
            _check_anchored(self.trusted.sequence, anchored, self.gaps)
        if records:
            self.count += len(records)
            yield batch()
        self.index = index

    def _ask_trusted_horizon(self) -> TrustedHash | None:
        """The range's last ledger and its hash from `PCBO_TRUSTED_HORIZON_URL` when it is set
        (`sources/horizon_ledgers.py`); None when not."""
        from pcbo_dagster.sources.horizon_ledgers import ledger_hash, trusted_horizon_url

        base = trusted_horizon_url()
        if base is None:
            return None
        sequence = self.end - 1
        return TrustedHash(
            sequence, ledger_hash(base, sequence), "source.uri", f"the trusted Horizon {redact_url(base)}'s"
        )

    def fetch(self, locators: np.ndarray) -> list[Any]:
        with _named_as_given(self.uri, self.shown):
            return self._fetch(locators)

    def _fetch(self, locators: np.ndarray) -> list[Any]:
        sequences = np.asarray(locators, dtype=np.int64)
        if not len(sequences):
            return []
        positions = self.index.positions(sequences) if self.index is not None else None
        if positions is None:
            return self._fetch_by_reading(sequences)
        index = self.index
        assert index is not None
        by_file: dict[int, list[int]] = {}
        for position in sorted(set(positions.tolist())):
            by_file.setdefault(index.file_of[position], []).append(position)
        files = sorted(by_file)
        tasks = [(index.files[f].uri, [index.location(k) for k in by_file[f]], self.root) for f in files]
        found: dict[int, DecodedLedger] = {}
        for decoded, error in self.pool.map(slice_batch_file, tasks, len(positions)):
            for ledger in decoded:
                found[ledger.sequence] = ledger
            if error is not None:
                _raise(error)
        ledgers = [found[s] for s in sequences.tolist()]
        digests = b"".join(ledger.record_sha256 for ledger in ledgers)
        return DigestedRecords(map(ledger_record, ledgers), digests)

    def _fetch_by_reading(self, sequences: np.ndarray) -> list[Any]:
        """The records of `sequences`, read again over their span (no pass 1 has indexed them)."""
        where: dict[int, list[int]] = {}
        for k, sequence in enumerate(sequences.tolist()):
            where.setdefault(sequence, []).append(k)
        out: list[Any] = [None] * len(sequences)
        digests = [b""] * len(sequences)
        first, end = int(sequences.min()), int(sequences.max()) + 1
        for _, ledger, record in _iter_decoded(self.uri, first, end, False, self.pool, root=self.root):
            for k in where.pop(record["ledgerSequence"], []):
                out[k], digests[k] = record, ledger.record_sha256
        if where:
            raise LedgerArchiveError(self.shown, f"ledgers {sorted(where)[:5]} are no longer in the archive")
        return DigestedRecords(out, b"".join(digests))
