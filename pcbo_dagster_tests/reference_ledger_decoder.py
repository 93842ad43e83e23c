"""The full stellar-sdk decoding of ledger archives that `sources/ledger_archives.py` did before the
skipping walker (kept verbatim as the reference the walker's records are checked against): every
ledger of a batch decoded into stellar-sdk objects, its record taken from them.

`reference_ledger_records(uri, first, end)` yields what `ledger_archives.iter_ledger_records`
yielded then, with the same checks in the same order (and the checks, added since, that a ledger's
transaction set and its transactions' results are the ones its header names)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

from pcbo_dagster.core.instants import format_instant
from pcbo_dagster.sources.ledger_archives import BatchFile, LedgerArchiveError, list_batch_files
from pcbo_dagster.sources.ledger_decoding import BatchReadError, read_batch_bytes

_MAX_CLOSE_TIME = 253_402_300_799


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


def transaction_set_error(meta: Any, header: Any) -> str | None:
    """Why the ledger's transaction set is not the one its header names (stellar-core's hash of it:
    a legacy set's previous ledger hash and envelopes, a generalized set's whole XDR) or names another
    previous ledger than its header, or None. (Added with the walker's check of the same.)"""
    tx_set = _body(meta).tx_set
    if meta.v == 0:
        previous = tx_set.previous_ledger_hash.hash
        digest = hashlib.sha256(previous + b"".join(e.to_xdr_bytes() for e in tx_set.txs)).digest()
    else:
        previous = tx_set.v1_tx_set.previous_ledger_hash.hash
        digest = hashlib.sha256(tx_set.to_xdr_bytes()).digest()
    expected = header.previous_ledger_hash.hash
    if previous != expected:
        return f"its transaction set names previous ledger {previous.hex()}, its header {expected.hex()}"
    if digest != header.scp_value.tx_set_hash.hash:
        return "its transaction set is not the one its header names (scpValue.txSetHash)"
    return None


def transaction_results_error(meta: Any, header: Any) -> str | None:
    """Why the ledger's results are not the ones its header names (stellar-core's hash of the
    TransactionResultSet of the result of each `txProcessing` entry, in their order), or None.
    (Added with the walker's check of the same.)"""
    from stellar_sdk.xdr import TransactionResultSet

    results = TransactionResultSet([entry.result for entry in _body(meta).tx_processing])
    if hashlib.sha256(results.to_xdr_bytes()).digest() != header.tx_set_result_hash.hash:
        return "its transaction results are not the ones its header names (txSetResultHash)"
    return None


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
    """The record of one ledger."""
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
    error = transaction_set_error(meta, header) or transaction_results_error(meta, header)
    if error is not None:
        raise LedgerArchiveError(uri, f"ledger {sequence}: {error}")
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


def reference_ledger_records(
    uri: str, first: int, end: int, *, require_complete: bool = False
) -> Iterator[dict[str, Any]]:
    """`iter_ledger_records` as it was: one batch file at a time, every ledger fully decoded."""
    expected = first
    previous: dict[str, Any] | None = None
    for batch in list_batch_files(uri, first, end):
        if require_complete and batch.start > expected:
            raise LedgerArchiveError(uri, f"ledgers {expected}-{batch.start - 1} are missing")
        try:
            data = read_batch_bytes(batch.uri)
        except BatchReadError as exc:
            raise LedgerArchiveError(exc.error.path, exc.error.message) from None
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


# -- the streamed source as it was, for whole `pcbo` runs through the reference ----------------------


def _reference_batches(self: Any, size: int) -> Iterator[tuple[list[Any], bool, Any]]:
    import numpy as np

    from pcbo_dagster.sources.ledger_archives import LEDGER_BATCH_BYTES

    records: list[Any] = []
    held = 0
    self.count = 0
    for record in reference_ledger_records(self.uri, self.first, self.end):
        records.append(record)
        held += len(record["lcmXdrBase64"])
        if len(records) >= size or held >= LEDGER_BATCH_BYTES:
            self.count += len(records)
            yield records, False, np.array([r["ledgerSequence"] for r in records], dtype=np.int64)
            records, held = [], 0
    if records:
        self.count += len(records)
        yield records, False, np.array([r["ledgerSequence"] for r in records], dtype=np.int64)


def _reference_fetch(self: Any, locators: Any) -> list[Any]:
    import numpy as np

    sequences = np.asarray(locators, dtype=np.int64)
    if not len(sequences):
        return []
    where: dict[int, list[int]] = {}
    for k, sequence in enumerate(sequences.tolist()):
        where.setdefault(sequence, []).append(k)
    out: list[Any] = [None] * len(sequences)
    for record in reference_ledger_records(self.uri, int(sequences.min()), int(sequences.max()) + 1):
        for k in where.pop(record["ledgerSequence"], []):
            out[k] = record
    if where:
        raise LedgerArchiveError(self.shown, f"ledgers {sorted(where)[:5]} are no longer in the archive")
    return out


def install_reference_source() -> None:
    """Make `LedgerArchiveSource` read as it did before the walker (for this process)."""
    from pcbo_dagster.sources.ledger_archives import LedgerArchiveSource

    LedgerArchiveSource.batches = _reference_batches  # type: ignore[method-assign]
    LedgerArchiveSource.fetch = _reference_fetch  # type: ignore[method-assign]


if __name__ == "__main__":  # `python -m pcbo_dagster_tests.reference_ledger_decoder execute ...`
    import sys

    install_reference_source()
    from pcbo_dagster.cli.main import main

    raise SystemExit(main(sys.argv[1:]))
