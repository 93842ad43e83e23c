"""SEP-54 batch files decoded into what each ledger's record needs, by the skipping walker.

A batch file is a zstd stream (frames may lack a content size, so it is read with zstandard's
streaming decompressor) of one XDR `LedgerCloseMetaBatch{startSequence, endSequence,
ledgerCloseMetas<>}`. `decode_batch` walks every ledger of it with `ledger_xdr.walk_ledger`, which
checks the whole LedgerCloseMeta as stellar-sdk's decoder would without building it, and keeps,
for the ledgers asked for, a `DecodedLedger`: the record's fields, the ledger's own XDR (base64,
sliced from the batch, not re-encoded), where that XDR lies in the batch, and the SHA-256 of the
ledger's record (`ledger_record`) in its RFC 8785 form: the digest the plan hash lists, computed here,
in the decoding worker processes, not by the process that waits for the records (issue 18).
`slice_batch` reads ledgers again from where a first decoding found them, without walking them:
their bytes must be the same (SHA-256) as then.

This module imports no more than a worker process (`decode_batch_file`, `slice_batch_file`) needs.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pcbo_dagster.core.canonical import record_digest_bytes
from pcbo_dagster.core.instants import format_instant
from pcbo_dagster.io.env_vars import positive_int
from pcbo_dagster.sources.ledger_xdr import LedgerFacts, XdrError, walk_ledger, xdr_words
from pcbo_dagster.sources.local_files import SourcesDirectory

_MAX_CLOSE_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z, the last instant pcbo can write
_WALK_ERRORS = (XdrError, IndexError, EOFError)


@dataclass(frozen=True, slots=True)
class DecodedLedger:
    """One ledger of a batch: its record's fields and where its XDR lies in the decompressed batch."""

    sequence: int
    close_time: int  # seconds
    ledger_hash: bytes
    previous_hash: bytes
    protocol: int
    transaction_count: int
    operation_count: int
    xdr_base64: str
    xdr_sha256: bytes
    offset: int  # bytes from the start of the decompressed batch
    length: int
    header_offset: int  # bytes from the start of the ledger's XDR to its LedgerHeader
    record_sha256: bytes = b""  # of `ledger_record(self)` in its RFC 8785 form (`with_record_digest`)


def ledger_record(ledger: DecodedLedger) -> dict[str, Any]:
    """The record of one decoded ledger (see `ledger_archives`)."""
    sequence = ledger.sequence
    return {
        "id": f"ledger-{sequence:010d}",
        "ledgerSequence": sequence,
        "occurredAt": format_instant(ledger.close_time * 1_000_000),
        "ledgerHash": ledger.ledger_hash.hex(),
        "previousLedgerHash": ledger.previous_hash.hex(),
        "protocolVersion": ledger.protocol,
        "transactionCount": ledger.transaction_count,
        "operationCount": ledger.operation_count,
        "lcmXdrBase64": ledger.xdr_base64,
        "lcmXdrSha256": "sha256:" + ledger.xdr_sha256.hex(),
        "consentGranted": True,
    }


def with_record_digest(ledger: DecodedLedger) -> DecodedLedger:
    """`ledger` with the SHA-256 of its record's RFC 8785 form (`core.canonical`'s, as the plan hash
    lists it: a ledger's record holds no float and no integer beyond 2**53, its close time being
    written as an instant)."""
    return replace(ledger, record_sha256=record_digest_bytes([ledger_record(ledger)], False))


@dataclass(frozen=True, slots=True)
class BatchError:
    """Why a batch could not be read further (an `InvalidInput` for the caller to raise)."""

    path: str
    message: str


#: Ledgers decoded from one batch file, then the error that stopped its reading, if any.
BatchResult = tuple[list[DecodedLedger], BatchError | None]


#: The most one batch file may decompress to (`PCBO_MAX_BATCH_BYTES`, default 256 MiB): a file that
#: decompresses past it (a zstd bomb, or not a ledger batch) is refused after reading that much. A
#: decoding process holds about five times what a batch decompresses to (its bytes, its XDR words,
#: and the base64 XDR of its ledgers, once built and once on its way back from a worker).
DEFAULT_MAX_BATCH_BYTES = 256 << 20

#: The most one ledger's LedgerCloseMeta XDR may hold (`PCBO_MAX_LEDGER_BYTES`, default 64 MiB; the
#: largest pubnet ledgers are a few MiB): a ledger past it is refused before its record is built (a
#: record holds its XDR in base64, and the engine holds whole records).
DEFAULT_MAX_LEDGER_BYTES = 64 << 20


def max_batch_bytes() -> int:
    return positive_int(
        "PCBO_MAX_BATCH_BYTES", os.environ.get("PCBO_MAX_BATCH_BYTES"), DEFAULT_MAX_BATCH_BYTES
    )


def max_ledger_bytes() -> int:
    return positive_int(
        "PCBO_MAX_LEDGER_BYTES", os.environ.get("PCBO_MAX_LEDGER_BYTES"), DEFAULT_MAX_LEDGER_BYTES
    )


def read_batch_bytes(uri: str, root: SourcesDirectory | None = None) -> bytes:
    """The decompressed XDR of one batch file (zstd frames with or without a content size);
    `BatchReadError` when it cannot be read or decompresses past `max_batch_bytes()`. A local batch
    file must be a regular file and, with `root` (a server's sources directory), inside it
    (`sources/local_files.py`)."""
    import fsspec
    import zstandard
    from fsspec.implementations.local import LocalFileSystem

    from pcbo_dagster.io.regular_files import NotRegularFile
    from pcbo_dagster.sources.local_files import OutsideSources, open_source_file

    limit = max_batch_bytes()
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if isinstance(fs, LocalFileSystem):
            opened = open_source_file(path, root)
        else:  # an object store, reached as a lake is (imported only then: it loads pyarrow)
            from pcbo_dagster.lake.storage import filesystem

            fs, path = filesystem(uri)
            opened = fs.open(path, "rb")
        with opened as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with reader:
                chunks, size = [], 0
                while chunk := reader.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise BatchReadError(
                            BatchError(uri, f"decompresses past {limit} bytes (PCBO_MAX_BATCH_BYTES)")
                        )
                    chunks.append(chunk)
        return b"".join(chunks)
    except zstandard.ZstdError as exc:
        raise BatchReadError(BatchError(uri, f"not a valid zstd stream: {exc}")) from None
    except NotRegularFile:
        raise BatchReadError(BatchError(uri, "not a regular file")) from None
    except OutsideSources as exc:
        raise BatchReadError(BatchError(uri, exc.reason)) from None
    except FileNotFoundError:
        raise BatchReadError(BatchError(uri, "no such file")) from None
    except OSError as exc:
        raise BatchReadError(BatchError(uri, f"cannot be read: {exc.__class__.__name__}: {exc}")) from None


class BatchReadError(Exception):
    """A batch file that cannot be read at all."""

    def __init__(self, error: BatchError) -> None:
        super().__init__(error.message)
        self.error = error


def decode_batch(data: bytes, uri: str, start: int, end: int, first: int, stop: int) -> BatchResult:
    """Check the decompressed batch `data` of the file named for ledgers `start`..`end` and decode
    its ledgers in [first, stop). Every ledger of the batch is walked (and so checked), its size
    too (`max_ledger_bytes()`); the hash of a ledger's header, the transaction set and the results it
    names and its close time are checked for the ledgers decoded."""
    most = max_ledger_bytes()
    words = xdr_words(data)
    if len(words) < 3:
        return [], BatchError(uri, "not an XDR LedgerCloseMetaBatch: it ends within its first 12 bytes")
    held_start, held_end, count = words[0], words[1], words[2]
    if (held_start, held_end) != (start, end):
        message = (
            f"the batch holds startSequence {held_start} and endSequence {held_end}, "
            f"its name says {start}-{end}"
        )
        return [], BatchError(uri, message)
    if count != end - start + 1:
        return [], BatchError(uri, f"the batch {start}-{end} holds {count} ledgers, not {end - start + 1}")
    decoded: list[DecodedLedger] = []
    i = 3
    for index in range(count):
        try:
            facts = walk_ledger(words, i)
        except _WALK_ERRORS as exc:
            detail = str(exc) or exc.__class__.__name__
            return decoded, BatchError(
                uri, f"ledger {index + 1} of {count} is not valid LedgerCloseMeta XDR: {detail}"
            )
        if facts.sequence != start + index:
            message = (
                f"ledger {index + 1} of the batch {start}-{end} has sequence {facts.sequence}, "
                f"not {start + index}"
            )
            return decoded, BatchError(uri, message)
        size = 4 * (facts.end - facts.start)
        if size > most:
            message = (
                f"ledger {facts.sequence} holds {size} bytes of XDR, more than {most} (PCBO_MAX_LEDGER_BYTES)"
            )
            return decoded, BatchError(uri, message)
        if first <= facts.sequence < stop:
            error = _check_header(data, words, facts)
            if error is not None:
                return decoded, BatchError(uri, f"ledger {facts.sequence}: {error}")
            decoded.append(_decoded(data, facts))
        i = facts.end
    remaining = len(data) - 4 * i
    if remaining:
        return decoded, BatchError(uri, f"{remaining} unexpected bytes after the batch's last ledger")
    return decoded, None


def _check_header(data: bytes, words: Any, facts: LedgerFacts) -> str | None:
    """Why the ledger's header is refused (its hash, the transaction set and the results it names,
    its close time), or None."""
    if hashlib.sha256(_canonical_header(data, words, facts)).digest() != _hash_of(data, facts):
        return "its hash is not the SHA-256 of its header (a corrupt header)"
    error = _check_transaction_set(data, facts)
    if error is not None:
        return error
    if not _results_are_named(data, facts):
        return "its transaction results are not the ones its header names (txSetResultHash)"
    if facts.close_time > _MAX_CLOSE_TIME:
        return f"close time {facts.close_time} is beyond year 9999"
    return None


def _check_transaction_set(data: bytes, facts: LedgerFacts) -> str | None:
    """Why the ledger's transaction set is refused, or None: it must be the one its header's
    `scpValue.txSetHash` names (hashed as stellar-core hashes it) and name the header's previous
    ledger. Every envelope is bound to the header so, and through the header to the ledger's hash."""
    header, start, end = 4 * facts.header_start, 4 * facts.tx_set_start, 4 * facts.tx_set_end
    # LedgerHeader {uint32 ledgerVersion; Hash previousLedgerHash; StellarValue {Hash txSetHash; ...}}
    previous, named = data[header + 4 : header + 36], data[header + 36 : header + 68]
    # TransactionSet {Hash previousLedgerHash; TransactionEnvelope txs<>;}, or GeneralizedTransactionSet
    # switch (int v) {case 1: TransactionSetV1 {Hash previousLedgerHash; TransactionPhase phases<>;}}
    at = start if facts.version == 0 else start + 4
    if data[at : at + 32] != previous:
        return (
            f"its transaction set names previous ledger {data[at : at + 32].hex()}, "
            f"its header {previous.hex()}"
        )
    kind = "TransactionSet" if facts.version == 0 else "GeneralizedTransactionSet"
    digest = _legacy_set_digest if facts.version == 0 else _sha256
    if not _hashes_as_core_hashes(data[start:end], kind, named, digest):
        return "its transaction set is not the one its header names (scpValue.txSetHash)"
    return None


def _sha256(xdr: bytes) -> bytes:
    return hashlib.sha256(xdr).digest()


def _legacy_set_digest(tx_set: bytes) -> bytes:
    """stellar-core's hash of a legacy TransactionSet (LedgerCloseMeta v0): its previous ledger hash
    followed by each envelope, its envelope count left out (a GeneralizedTransactionSet's is the
    SHA-256 of its whole XDR)."""
    return hashlib.sha256(tx_set[:32] + tx_set[36:]).digest()


def _results_are_named(data: bytes, facts: LedgerFacts) -> bool:
    """Whether the ledger's results are the ones its header's `txSetResultHash` names: stellar-core's
    SHA-256 of the XDR `TransactionResultSet {TransactionResultPair results<>;}` of the result of
    each entry of its `txProcessing`, in their order (the apply order, in which core collects them).
    Every result is bound to the header so, and through it to the ledger's hash. (A
    TransactionResultPair holds no padding, boolean or optional today: its stored XDR is core's, and
    the re-encoding of a set that does not match as stored changes nothing.)"""
    bounds = facts.results
    pairs = [data[4 * bounds[k] : 4 * bounds[k + 1]] for k in range(0, len(bounds), 2)]
    at = 4 * facts.result_hash_start
    result_set = struct.pack(">I", len(pairs)) + b"".join(pairs)
    return _hashes_as_core_hashes(result_set, "TransactionResultSet", data[at : at + 32], _sha256)


def _hashes_as_core_hashes(xdr: bytes, kind: str, named: bytes, digest: Callable[[bytes], bytes]) -> bool:
    """Whether the XDR of a `kind` value (stellar-sdk's class name) hashes by `digest` to `named` as
    stellar-core encodes it: with padding zero. A value that does not match as stored is re-encoded
    with stellar-sdk (which zeroes the padding a decoder does not read) and hashed again: only then,
    as a real archive has no such padding."""
    if digest(xdr) == named:
        return True
    from stellar_sdk import xdr as stellar_xdr  # only for a value that does not match as stored

    canonical = getattr(stellar_xdr, kind).from_xdr_bytes(xdr).to_xdr_bytes()
    return canonical != xdr and digest(canonical) == named


def _hash_of(data: bytes, facts: LedgerFacts) -> bytes:
    return data[4 * facts.header_start - 32 : 4 * facts.header_start]


def _canonical_header(data: bytes, words: Any, facts: LedgerFacts) -> bytes:
    """The LedgerHeader's bytes as stellar-core hashes them (and stellar-sdk re-encodes them): as
    stored, but with the padding of its byte strings zero (a decoder does not read padding)."""
    header = data[4 * facts.header_start : 4 * facts.header_end]
    h = facts.header_start
    padding: list[tuple[int, int]] = []  # byte ranges, from the start of `data`

    def opaque(i: int) -> int:  # a variable-length byte string at word i: note its padding, skip it
        size = words[i]
        if size % 4:
            padding.append((4 * i + 4 + size, 4 * i + 4 + (size + 3) // 4 * 4))
        return i + 1 + (size + 3) // 4

    # StellarValue {Hash txSetHash; TimePoint closeTime; UpgradeType upgrades<6>; union switch
    # (StellarValueType v) {case STELLAR_VALUE_BASIC: void; case STELLAR_VALUE_SIGNED:
    # LedgerCloseValueSignature {NodeID nodeID; Signature signature;} lcValueSignature;} ext;}
    i = h + 19
    upgrades = words[i]
    i += 1
    for _ in range(upgrades):
        i = opaque(i)
    if words[i] == 1:
        opaque(i + 10)  # after the discriminant and the NodeID (a key type and 32 bytes)
    if not padding or all(not any(data[a:b]) for a, b in padding):
        return header
    canonical = bytearray(header)
    for a, b in padding:
        canonical[a - 4 * h : b - 4 * h] = bytes(b - a)
    return bytes(canonical)


def _decoded(data: bytes, facts: LedgerFacts) -> DecodedLedger:
    offset, end = 4 * facts.start, 4 * facts.end
    xdr = data[offset:end]
    header = 4 * facts.header_start
    ledger = DecodedLedger(
        sequence=facts.sequence,
        close_time=facts.close_time,
        ledger_hash=data[header - 32 : header],
        previous_hash=data[header + 4 : header + 36],
        protocol=facts.protocol,
        transaction_count=facts.transaction_count,
        operation_count=facts.operation_count,
        xdr_base64=base64.b64encode(xdr).decode("ascii"),
        xdr_sha256=hashlib.sha256(xdr).digest(),
        offset=offset,
        length=end - offset,
        header_offset=header - offset,
    )
    return with_record_digest(ledger)


def decode_batch_file(
    uri: str, start: int, end: int, first: int, stop: int, root: SourcesDirectory | None = None
) -> BatchResult:
    """`decode_batch` of the file at `uri` (what a worker process runs); `root`: see `read_batch_bytes`."""
    try:
        data = read_batch_bytes(uri, root)
    except BatchReadError as exc:
        return [], exc.error
    return decode_batch(data, uri, start, end, first, stop)


#: Where a first decoding found a ledger: (sequence, offset, length, header offset, transactions,
#: operations, SHA-256 of its XDR).
Location = tuple[int, int, int, int, int, int, bytes]


def slice_batch(data: bytes, uri: str, locations: list[Location]) -> BatchResult:
    """The ledgers at `locations` of a batch decoded before, read again without walking them. A
    ledger whose bytes are no longer those first decoded is an error."""
    out: list[DecodedLedger] = []
    for sequence, offset, length, header_offset, transactions, operations, digest in locations:
        xdr = data[offset : offset + length]
        if len(xdr) != length or hashlib.sha256(xdr).digest() != digest:
            return out, BatchError(uri, f"ledger {sequence} changed since the archive was first read")
        header = header_offset
        (protocol,) = struct.unpack_from(">I", xdr, header)
        (close_time,) = struct.unpack_from(">Q", xdr, header + 68)  # after the version and two hashes
        ledger = DecodedLedger(
            sequence=sequence,
            close_time=close_time,
            ledger_hash=xdr[header - 32 : header],
            previous_hash=xdr[header + 4 : header + 36],
            protocol=protocol,
            transaction_count=transactions,
            operation_count=operations,
            xdr_base64=base64.b64encode(xdr).decode("ascii"),
            xdr_sha256=digest,
            offset=offset,
            length=length,
            header_offset=header_offset,
        )
        out.append(with_record_digest(ledger))
    return out, None


def slice_batch_file(
    uri: str, locations: list[Location], root: SourcesDirectory | None = None
) -> BatchResult:
    """`slice_batch` of the file at `uri` (what a worker process runs); `root`: see `read_batch_bytes`."""
    try:
        data = read_batch_bytes(uri, root)
    except BatchReadError as exc:
        return [], exc.error
    return slice_batch(data, uri, locations)
