"""Ledger archives in the SEP-54 ("Galexie") layout, read as one JSON-able record per ledger.

Layout under an archive's ledgers path (a local directory, or any fsspec URL such as `s3://...`):

    <%08X--pStart-pEnd>/<%08X--start[-end]>.xdr.zst     (older archives: `.xdr.zstd`)

The hex prefix is 0xFFFFFFFF minus the (partition or batch) start, so newer ledgers list first. A
batch file without `-end` holds one ledger. Archives written with one file per partition have no
partition folders: their batch files sit directly under the ledgers path; both forms are read.
Dot files (SEP-54's `.config.json`) are ignored; any other name that does not follow the layout is
refused, naming it.

Each batch file is a zstd stream (frames may lack a content size, so it is read with zstandard's
streaming decompressor) of one XDR `LedgerCloseMetaBatch{startSequence, endSequence,
ledgerCloseMetas<>}`. Every ledger of a batch is decoded, one at a time, and its own
`LedgerCloseMeta` bytes are kept exactly as stored (sliced from the batch, not re-encoded).

`iter_ledger_records(uri, first, end)` yields, for the ledgers in [first, end) in ledger order:

    {"id": "ledger-<seq, 10 digits>", "ledgerSequence", "occurredAt" (close time, an instant),
     "ledgerHash", "previousLedgerHash" (hex), "protocolVersion", "transactionCount",
     "operationCount", "lcmXdrBase64", "lcmXdrSha256" ("sha256:<hex>"), "consentGranted": true}

Counts are over the ledger's transaction set (successful and failed transactions alike): the
`TransactionSet` of a v0 meta, every phase of the `GeneralizedTransactionSet` of a v1/v2 meta
(classic components and Soroban parallel stages). Operations are counted from the envelopes; a fee
bump counts the operations of its inner transaction.

Batch files are chosen by their names alone (files and partition folders outside the range are
never opened) and read one at a time, so memory holds one decompressed batch. Checks, each an
`InvalidInput` naming the file: the name's range against the batch's startSequence/endSequence and
against the ledgers inside (one per sequence, in order), a corrupt zstd stream or XDR, trailing
bytes, overlapping batch files, and each ledger's hash against the SHA-256 of its header XDR.
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import format_instant
from pcbo_dagster.sources.streaming import RecordSource

MAX_UINT32 = 0xFFFFFFFF
_MAX_CLOSE_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z, the last instant pcbo can write
_NUMBER = r"(0|[1-9][0-9]{0,9})"  # decimal as Go's %d writes it: no sign, no leading zeros
_PARTITION_RE = re.compile(rf"^(?P<hex>[0-9A-F]{{8}})--(?P<start>{_NUMBER})-(?P<end>{_NUMBER})$")
_BATCH_RE = re.compile(
    rf"^(?P<hex>[0-9A-F]{{8}})--(?P<start>{_NUMBER})(?:-(?P<end>{_NUMBER}))?(?P<suffix>\.xdr\.zstd?)$"
)


class LedgerArchiveError(InvalidInput):
    """A ledger archive that cannot be read as SEP-54: `path` names the folder or file at fault."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__("source", f"{path}: {message}")


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
    try:
        return list(fs.ls(path, detail=True))
    except FileNotFoundError:
        raise LedgerArchiveError(display, "no such archive folder") from None
    except NotADirectoryError:
        raise LedgerArchiveError(display, "not a folder") from None
    except OSError as exc:
        raise LedgerArchiveError(display, f"cannot be listed: {exc.__class__.__name__}") from None


def _basename(entry: dict[str, Any]) -> str:
    return posixpath.basename(str(entry["name"]).rstrip("/"))


def list_batch_files(uri: str, first: int, end: int) -> list[BatchFile]:
    """The batch files of the archive at `uri` holding any ledger of [first, end), by their names
    alone, in ledger order. Partition folders outside the range are not even listed."""
    _check_range(first, end)
    fs, root = fsspec.core.url_to_fs(uri)
    batches: list[BatchFile] = []

    def add_file(entry: dict[str, Any], inside: KeyRange | None) -> None:
        where = _uri(fs, entry["name"])
        key = parse_batch_name(_basename(entry), where)
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
        if entry.get("type") == "directory":
            part = parse_partition_name(name, _uri(fs, entry["name"]))
            if not part.intersects(first, end):
                continue
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


# -- decoding -------------------------------------------------------------------------------------


def read_batch_bytes(uri: str) -> bytes:
    """The decompressed XDR of one batch file (zstd frames with or without a content size)."""
    import zstandard

    try:
        with fsspec.open(uri, "rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with reader:
                chunks = []
                while chunk := reader.read(1 << 20):
                    chunks.append(chunk)
        return b"".join(chunks)
    except zstandard.ZstdError as exc:
        raise LedgerArchiveError(uri, f"not a valid zstd stream: {exc}") from None
    except FileNotFoundError:
        raise LedgerArchiveError(uri, "no such file") from None
    except OSError as exc:
        raise LedgerArchiveError(uri, f"cannot be read: {exc.__class__.__name__}: {exc}") from None


def _decode_errors() -> tuple[type[BaseException], ...]:
    import struct

    import xdrlib3

    return (ValueError, EOFError, IndexError, struct.error, xdrlib3.Error)


def iter_batch_ledgers(data: bytes, batch: BatchFile) -> Iterator[tuple[int, Any, bytes]]:
    """(sequence, LedgerCloseMeta, its exact XDR bytes) for every ledger of a decompressed batch,
    after checking the batch against its file name."""
    from stellar_sdk.xdr import LedgerCloseMeta, Uint32
    from xdrlib3 import Unpacker

    errors = _decode_errors()
    unpacker = Unpacker(data)
    try:
        start = Uint32.unpack(unpacker).uint32
        end = Uint32.unpack(unpacker).uint32
        count = unpacker.unpack_uint()
    except errors as exc:
        raise LedgerArchiveError(batch.uri, f"not an XDR LedgerCloseMetaBatch: {exc}") from None
    if (start, end) != (batch.start, batch.end):
        raise LedgerArchiveError(
            batch.uri,
            f"the batch holds startSequence {start} and endSequence {end}, "
            f"its name says {batch.start}-{batch.end}",
        )
    if count != end - start + 1:
        raise LedgerArchiveError(
            batch.uri, f"the batch {start}-{end} holds {count} ledgers, not {end - start + 1}"
        )
    for offset in range(count):
        position = unpacker.get_position()
        try:
            meta = LedgerCloseMeta.unpack(unpacker)
        except errors as exc:
            raise LedgerArchiveError(
                batch.uri, f"ledger {offset + 1} of {count} is not valid LedgerCloseMeta XDR: {exc}"
            ) from None
        sequence = ledger_header_entry(meta).header.ledger_seq.uint32
        if sequence != start + offset:
            raise LedgerArchiveError(
                batch.uri,
                f"ledger {offset + 1} of the batch {start}-{end} has sequence {sequence}, "
                f"not {start + offset}",
            )
        yield sequence, meta, data[position : unpacker.get_position()]
    remaining = len(data) - unpacker.get_position()
    if remaining:
        raise LedgerArchiveError(batch.uri, f"{remaining} unexpected bytes after the batch's last ledger")


def ledger_header_entry(meta: Any) -> Any:
    """The `LedgerHeaderHistoryEntry` of a LedgerCloseMeta v0, v1 or v2."""
    body = _body(meta)
    return body.ledger_header


def _body(meta: Any) -> Any:
    body = {0: meta.v0, 1: meta.v1, 2: meta.v2}.get(meta.v)
    if body is None:
        raise ValueError(f"LedgerCloseMeta v{meta.v} is not supported")
    return body


def transaction_envelopes(meta: Any) -> list[Any]:
    """Every TransactionEnvelope of the ledger's transaction set, in the order stored."""
    body = _body(meta)
    if meta.v == 0:
        return list(body.tx_set.txs)
    tx_set = body.tx_set  # GeneralizedTransactionSet
    if tx_set.v != 1 or tx_set.v1_tx_set is None:
        raise ValueError(f"GeneralizedTransactionSet v{tx_set.v} is not supported")
    envelopes: list[Any] = []
    for phase in tx_set.v1_tx_set.phases:
        if phase.v == 0:
            for component in phase.v0_components or []:
                envelopes.extend(component.txs_maybe_discounted_fee.txs)
        elif phase.v == 1:
            for stage in phase.parallel_txs_component.execution_stages:
                for cluster in stage.parallel_tx_execution_stage:
                    envelopes.extend(cluster.dependent_tx_cluster)
        else:
            raise ValueError(f"TransactionPhase v{phase.v} is not supported")
    return envelopes


def operation_count(envelope: Any) -> int:
    """Operations of one envelope; a fee bump counts its inner transaction's."""
    if envelope.v0 is not None:
        return len(envelope.v0.tx.operations)
    if envelope.v1 is not None:
        return len(envelope.v1.tx.operations)
    if envelope.fee_bump is not None:
        return len(envelope.fee_bump.tx.inner_tx.v1.tx.operations)
    raise ValueError(f"TransactionEnvelope of type {envelope.type} has no body")


def ledger_record(sequence: int, meta: Any, xdr: bytes, uri: str) -> dict[str, Any]:
    """The record of one ledger (see the module docstring)."""
    try:
        entry = ledger_header_entry(meta)
        header = entry.header
        envelopes = transaction_envelopes(meta)
        operations = sum(operation_count(e) for e in envelopes)
        header_hash = hashlib.sha256(header.to_xdr_bytes()).digest()
    except (ValueError, AttributeError) as exc:
        raise LedgerArchiveError(uri, f"ledger {sequence}: {exc}") from None
    if entry.hash.hash != header_hash:
        raise LedgerArchiveError(
            uri, f"ledger {sequence}: its hash is not the SHA-256 of its header (a corrupt header)"
        )
    close_time = header.scp_value.close_time.time_point.uint64
    if close_time > _MAX_CLOSE_TIME:
        raise LedgerArchiveError(uri, f"ledger {sequence}: close time {close_time} is beyond year 9999")
    return {
        "id": f"ledger-{sequence:010d}",
        "ledgerSequence": sequence,
        "occurredAt": format_instant(close_time * 1_000_000),
        "ledgerHash": entry.hash.hash.hex(),
        "previousLedgerHash": header.previous_ledger_hash.hash.hex(),
        "protocolVersion": header.ledger_version.uint32,
        "transactionCount": len(envelopes),
        "operationCount": operations,
        "lcmXdrBase64": base64.b64encode(xdr).decode("ascii"),
        "lcmXdrSha256": "sha256:" + hashlib.sha256(xdr).hexdigest(),
        "consentGranted": True,
    }


def iter_ledger_records(
    uri: str, first: int, end: int, *, require_complete: bool = False
) -> Iterator[dict[str, Any]]:
    """One record per ledger of [first, end) held by the archive at `uri`, in ledger order, reading
    one batch file at a time. A batch cut by the range yields only its ledgers inside the range.
    With `require_complete`, a ledger of the range missing from the archive is an error; consecutive
    ledgers must always chain (previousLedgerHash = the previous ledger's hash)."""
    expected = first
    previous: dict[str, Any] | None = None
    for batch in list_batch_files(uri, first, end):
        if require_complete and batch.start > expected:
            raise LedgerArchiveError(uri, f"ledgers {expected}-{batch.start - 1} are missing")
        data = read_batch_bytes(batch.uri)
        for sequence, meta, xdr in iter_batch_ledgers(data, batch):
            if not first <= sequence < end:
                continue
            record = ledger_record(sequence, meta, xdr, batch.uri)
            if previous is not None and previous["ledgerSequence"] == sequence - 1:
                if record["previousLedgerHash"] != previous["ledgerHash"]:
                    raise LedgerArchiveError(
                        batch.uri,
                        f"ledger {sequence}: previousLedgerHash does not match ledger {sequence - 1}'s hash",
                    )
            previous = record
            expected = sequence + 1
            yield record
        del data
    if require_complete and expected < end:
        raise LedgerArchiveError(uri, f"ledgers {expected}-{end - 1} are missing")


#: A batch of ledger records also ends once it holds this many bytes of ledger XDR (ledgers are large).
LEDGER_BATCH_BYTES = 64 << 20


class LedgerArchiveSource(RecordSource):
    """The ledgers [first, end) of an archive as a streamed source (`engine.request_loading`): read in
    batches of up to `size` ledgers or `LEDGER_BATCH_BYTES` of XDR, a record's locator its ledger
    sequence; `fetch` reads the archive again over the span of the sequences asked for (a partition's
    ledgers are one span)."""

    kind = "ledger_archive"

    def __init__(self, uri: str, shown: str, first: int, end: int) -> None:
        super().__init__(uri, shown)
        self.first, self.end = first, end

    def batches(self, size: int) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        records: list[Any] = []
        held = 0
        self.count = 0
        for record in iter_ledger_records(self.uri, self.first, self.end):
            records.append(record)
            held += len(record["lcmXdrBase64"])
            if len(records) >= size or held >= LEDGER_BATCH_BYTES:
                self.count += len(records)
                yield records, False, np.array([r["ledgerSequence"] for r in records], dtype=np.int64)
                records, held = [], 0
        if records:
            self.count += len(records)
            yield records, False, np.array([r["ledgerSequence"] for r in records], dtype=np.int64)

    def fetch(self, locators: np.ndarray) -> list[Any]:
        sequences = np.asarray(locators, dtype=np.int64)
        if not len(sequences):
            return []
        where: dict[int, list[int]] = {}
        for k, sequence in enumerate(sequences.tolist()):
            where.setdefault(sequence, []).append(k)
        out: list[Any] = [None] * len(sequences)
        for record in iter_ledger_records(self.uri, int(sequences.min()), int(sequences.max()) + 1):
            for k in where.pop(record["ledgerSequence"], []):
                out[k] = record
        if where:
            raise LedgerArchiveError(self.shown, f"ledgers {sorted(where)[:5]} are no longer in the archive")
        return out
