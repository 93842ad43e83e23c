"""Build small SEP-54 ("Galexie") ledger archives for tests, with stellar-sdk's XDR types.

`write_archive(root, first=2, last=21, ledgers_per_file=4, files_per_partition=2)` writes
`root/<%08X--pStart-pEnd>/<%08X--start-end>.xdr.zst` files, each a zstd-compressed
`LedgerCloseMetaBatch`, and returns a `BuiltArchive` with what every ledger should read back as.
Partitions and batches are aligned on multiples of their size from 0, as Galexie aligns them, so the
first partition and batch may start before `first` (their earlier ledgers are simply absent: a
batch always holds exactly its named range, so `first` is rounded down to a batch boundary).

Ledgers are real: each header's `previousLedgerHash` is the hash of the ledger before, its
`scpValue.txSetHash` the hash of its transaction set (`tx_set_hash`), its `txSetResultHash` the hash
of its transactions' results (`tx_result_set_hash`), and a ledger's hash is the SHA-256 of its header
XDR, as stellar-core computes them. Ledger `seq` holds `1 + seq % 3` transactions; transaction `t`
has `1 + (seq + t) % 4` operations (manage data, each successful); every third ledger's last
transaction is a fee bump. Each transaction has its `txProcessing` entry, in apply order (the set's
order), holding its result (the fee charged: 100 an operation, and one more for a fee bump) and an
operation meta per operation with no ledger entry changes. `version` picks the LedgerCloseMeta
arm: 0 (TransactionSet, the simplest), 1 (GeneralizedTransactionSet, one classic phase) or 2 (a
classic phase plus a Soroban parallel phase holding the same transactions split over two stages,
applied, and so in `txProcessing`, after the classic phase).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard
from stellar_sdk import Account, Keypair, Network, TransactionBuilder
from stellar_sdk import xdr as x

from pcbo_dagster.sources.ledger_archives import batch_name, partition_name

PROTOCOL = 21
GENESIS_CLOSE_TIME = 1_700_000_000  # 2023-11-14T22:13:20Z
CLOSE_SECONDS = 5
_PASSPHRASE = Network.TESTNET_NETWORK_PASSPHRASE
_SOURCE = Keypair.from_raw_ed25519_seed(bytes(range(32)))
_FEE_SOURCE = Keypair.from_raw_ed25519_seed(bytes(range(1, 33)))


@dataclass
class BuiltLedger:
    sequence: int
    close_time: int
    ledger_hash: bytes
    previous_hash: bytes
    protocol: int
    transaction_count: int
    operation_count: int
    xdr: bytes  # this ledger's LedgerCloseMeta XDR
    path: Path | None = None  # the batch file holding it


@dataclass
class BuiltArchive:
    root: Path
    ledgers: dict[int, BuiltLedger] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def file_of(self, sequence: int) -> Path:
        path = self.ledgers[sequence].path
        assert path is not None
        return path


def _hash(value: bytes) -> x.Hash:
    return x.Hash(value)


def transactions_for(sequence: int) -> list[x.TransactionEnvelope]:
    """The deterministic, signed transaction envelopes of ledger `sequence`."""
    return [envelope for envelope, _ in _transactions(sequence)]


def _transactions(sequence: int) -> list[tuple[x.TransactionEnvelope, x.TransactionResultPair]]:
    """The signed envelopes of ledger `sequence` and their results (each operation successful)."""
    out = []
    count = 1 + sequence % 3
    for t in range(count):
        builder = TransactionBuilder(Account(_SOURCE.public_key, sequence * 10 + t), _PASSPHRASE, 100)
        builder.add_time_bounds(0, 0)  # no wall clock
        operations = 1 + (sequence + t) % 4
        for o in range(operations):
            builder.append_manage_data_op(f"k{sequence}-{t}-{o}", b"v")
        tx = builder.build()
        tx.sign(_SOURCE)
        success = x.ManageDataResult(x.ManageDataResultCode.MANAGE_DATA_SUCCESS)
        results = [
            x.OperationResult(
                x.OperationResultCode.opINNER,
                x.OperationResultTr(x.OperationType.MANAGE_DATA, manage_data_result=success),
            )
            for _ in range(operations)
        ]
        fee = x.Int64(100 * operations)
        if sequence % 3 == 0 and t == count - 1:
            bump = TransactionBuilder.build_fee_bump_transaction(_FEE_SOURCE, 200, tx, _PASSPHRASE)
            bump.sign(_FEE_SOURCE)
            inner = x.InnerTransactionResult(
                x.Int64(0),
                x.InnerTransactionResultResult(x.TransactionResultCode.txSUCCESS, results=results),
                x.InnerTransactionResultExt(0),
            )
            result = x.TransactionResultResult(
                x.TransactionResultCode.txFEE_BUMP_INNER_SUCCESS,
                inner_result_pair=x.InnerTransactionResultPair(_hash(tx.hash()), inner),
            )
            pair = x.TransactionResultPair(
                _hash(bump.hash()),
                x.TransactionResult(x.Int64(100 * (operations + 1)), result, x.TransactionResultExt(0)),
            )
            out.append((bump.to_xdr_object(), pair))
        else:
            result = x.TransactionResultResult(x.TransactionResultCode.txSUCCESS, results=results)
            pair = x.TransactionResultPair(
                _hash(tx.hash()), x.TransactionResult(fee, result, x.TransactionResultExt(0))
            )
            out.append((tx.to_xdr_object(), pair))
    return out


def expected_operations(sequence: int) -> int:
    return sum(1 + (sequence + t) % 4 for t in range(1 + sequence % 3))


def ledger_header(
    sequence: int,
    previous_hash: bytes,
    close_time: int,
    protocol: int,
    tx_set_hash: bytes,
    tx_result_set_hash: bytes,
) -> x.LedgerHeader:
    """The header of ledger `sequence`; `tx_set_hash`: its transaction set's (`tx_set_hash`),
    `tx_result_set_hash`: its transactions' results' (`tx_result_set_hash`)."""
    zero = _hash(bytes(32))
    return x.LedgerHeader(
        ledger_version=x.Uint32(protocol),
        previous_ledger_hash=_hash(previous_hash),
        scp_value=x.StellarValue(
            tx_set_hash=_hash(tx_set_hash),
            close_time=x.TimePoint(x.Uint64(close_time)),
            upgrades=[],
            ext=x.StellarValueExt(v=x.StellarValueType.STELLAR_VALUE_BASIC),
        ),
        tx_set_result_hash=_hash(tx_result_set_hash),
        bucket_list_hash=zero,
        ledger_seq=x.Uint32(sequence),
        total_coins=x.Int64(1_000_000_000_000_000_000),
        fee_pool=x.Int64(0),
        inflation_seq=x.Uint32(0),
        id_pool=x.Uint64(0),
        base_fee=x.Uint32(100),
        base_reserve=x.Uint32(5_000_000),
        max_tx_set_size=x.Uint32(1000),
        skip_list=[zero, zero, zero, zero],
        ext=x.LedgerHeaderExt(v=0),
    )


def tx_set_hash(tx_set: bytes, *, legacy: bool) -> bytes:
    """A transaction set's hash as stellar-core computes it (what a header's `scpValue.txSetHash`
    holds), from its XDR: a `legacy` TransactionSet (LedgerCloseMeta v0) hashes its previous ledger
    hash followed by its envelopes (its envelope count left out), a GeneralizedTransactionSet its
    whole XDR."""
    return hashlib.sha256(tx_set[:32] + tx_set[36:] if legacy else tx_set).digest()


def tx_result_set_hash(pairs: list[bytes]) -> bytes:
    """What a header's `txSetResultHash` holds, as stellar-core computes it: the SHA-256 of the XDR
    `TransactionResultSet {TransactionResultPair results<>;}` of the ledger's results in apply order
    (the order of its LedgerCloseMeta's `txProcessing`), from each TransactionResultPair's XDR."""
    return hashlib.sha256(len(pairs).to_bytes(4, "big") + b"".join(pairs)).digest()


def _result_meta(pair: x.TransactionResultPair, operations: int, version: int) -> Any:
    """The `txProcessing` entry of a transaction: its result, no fee or entry changes."""
    meta = x.TransactionMeta(0, operations=[x.OperationMeta(x.LedgerEntryChanges([]))] * operations)
    none = x.LedgerEntryChanges([])
    if version == 2:
        return x.TransactionResultMetaV1(x.ExtensionPoint(0), pair, none, meta, none)
    return x.TransactionResultMeta(pair, none, meta)


def _classic_phase(envelopes: list[x.TransactionEnvelope]) -> x.TransactionPhase:
    component = x.TxSetComponent(
        type=x.TxSetComponentType.TXSET_COMP_TXS_MAYBE_DISCOUNTED_FEE,
        txs_maybe_discounted_fee=x.TxSetComponentTxsMaybeDiscountedFee(base_fee=None, txs=envelopes),
    )
    return x.TransactionPhase(v=0, v0_components=[component])


def _parallel_phase(envelopes: list[x.TransactionEnvelope]) -> x.TransactionPhase:
    half = len(envelopes) // 2
    stages = [
        x.ParallelTxExecutionStage([x.DependentTxCluster(envelopes[:half])]),
        x.ParallelTxExecutionStage([x.DependentTxCluster(envelopes[half:]), x.DependentTxCluster([])]),
    ]
    return x.TransactionPhase(
        v=1, parallel_txs_component=x.ParallelTxsComponent(base_fee=x.Int64(100), execution_stages=stages)
    )


def ledger_close_meta(
    sequence: int,
    previous_hash: bytes,
    *,
    version: int = 0,
    close_time: int | None = None,
    protocol: int = PROTOCOL,
) -> tuple[x.LedgerCloseMeta, BuiltLedger]:
    if close_time is None:
        close_time = GENESIS_CLOSE_TIME + sequence * CLOSE_SECONDS
    transactions = _transactions(sequence)
    envelopes = [envelope for envelope, _ in transactions]
    processing = [
        _result_meta(pair, 1 + (sequence + t) % 4, version) for t, (_, pair) in enumerate(transactions)
    ]
    prev = _hash(previous_hash)
    tx_count, op_count = len(envelopes), expected_operations(sequence)
    tx_set: x.TransactionSet | x.GeneralizedTransactionSet
    if version == 0:
        tx_set = x.TransactionSet(previous_ledger_hash=prev, txs=envelopes)
    else:
        phases = [_classic_phase(envelopes)]
        if version == 2:  # applied after the classic phase, in the order of its stages and clusters
            phases.append(_parallel_phase(envelopes))
            tx_count, op_count, processing = 2 * tx_count, 2 * op_count, 2 * processing
        tx_set = x.GeneralizedTransactionSet(v=1, v1_tx_set=x.TransactionSetV1(prev, phases))
    header = ledger_header(
        sequence,
        previous_hash,
        close_time,
        protocol,
        tx_set_hash(tx_set.to_xdr_bytes(), legacy=version == 0),
        tx_result_set_hash([p.result.to_xdr_bytes() for p in processing]),
    )
    ledger_hash = hashlib.sha256(header.to_xdr_bytes()).digest()
    entry = x.LedgerHeaderHistoryEntry(
        hash=_hash(ledger_hash), header=header, ext=x.LedgerHeaderHistoryEntryExt(v=0)
    )
    if isinstance(tx_set, x.TransactionSet):
        meta = x.LedgerCloseMeta(
            v=0,
            v0=x.LedgerCloseMetaV0(
                ledger_header=entry,
                tx_set=tx_set,
                tx_processing=processing,
                upgrades_processing=[],
                scp_info=[],
            ),
        )
    else:
        common: dict[str, Any] = {
            "ext": x.LedgerCloseMetaExt(v=0),
            "ledger_header": entry,
            "tx_set": tx_set,
            "tx_processing": processing,
            "upgrades_processing": [],
            "scp_info": [],
            "total_byte_size_of_live_soroban_state": x.Uint64(0),
            "evicted_keys": [],
        }
        if version == 1:
            meta = x.LedgerCloseMeta(v=1, v1=x.LedgerCloseMetaV1(**common, unused=[]))
        elif version == 2:
            meta = x.LedgerCloseMeta(v=2, v2=x.LedgerCloseMetaV2(**common))
        else:
            raise ValueError(f"LedgerCloseMeta v{version} is not built here")
    built = BuiltLedger(
        sequence=sequence,
        close_time=close_time,
        ledger_hash=ledger_hash,
        previous_hash=previous_hash,
        protocol=protocol,
        transaction_count=tx_count,
        operation_count=op_count,
        xdr=meta.to_xdr_bytes(),
    )
    return meta, built


def compress(data: bytes, *, streaming: bool) -> bytes:
    """zstd: `streaming` writes a frame WITHOUT a content size (as a streaming writer does)."""
    if not streaming:
        return zstandard.ZstdCompressor(write_content_size=True).compress(data)
    compressor = zstandard.ZstdCompressor().compressobj()
    return compressor.compress(data) + compressor.flush()


def frame_has_content_size(data: bytes) -> bool:
    return zstandard.get_frame_parameters(data).content_size != zstandard.CONTENTSIZE_UNKNOWN


def batch_bytes(start: int, end: int, metas: list[x.LedgerCloseMeta]) -> bytes:
    return x.LedgerCloseMetaBatch(x.Uint32(start), x.Uint32(end), metas).to_xdr_bytes()


def write_archive(
    root: Path,
    first: int,
    last: int,
    *,
    ledgers_per_file: int = 1,
    files_per_partition: int = 4,
    version: int = 0,
    streaming: Callable[[int], bool] = lambda index: index % 2 == 0,
    legacy_suffix: Callable[[int], bool] = lambda index: index % 3 == 1,
) -> BuiltArchive:
    """Write the ledgers `first`..`last` (rounded out to whole batches) under `root`.

    `streaming(i)` / `legacy_suffix(i)` decide, for the i-th batch file written (from 0), whether its
    frame lacks a content size and whether it is named `.xdr.zstd` instead of `.xdr.zst`. With
    `files_per_partition == 1` there are no partition folders (Galexie's layout for that case)."""
    root.mkdir(parents=True, exist_ok=True)
    archive = BuiltArchive(root)
    batch_start = first - first % ledgers_per_file
    partition_size = ledgers_per_file * files_per_partition
    previous_hash = hashlib.sha256(b"genesis-%d" % batch_start).digest()
    index = 0
    while batch_start <= last:
        batch_end = batch_start + ledgers_per_file - 1
        metas, built = [], []
        for sequence in range(batch_start, batch_end + 1):
            meta, ledger = ledger_close_meta(sequence, previous_hash, version=version)
            previous_hash = ledger.ledger_hash
            metas.append(meta)
            built.append(ledger)
        folder = root
        if files_per_partition > 1:
            p_start = batch_start - batch_start % partition_size
            folder = root / partition_name(p_start, p_start + partition_size - 1)
            folder.mkdir(exist_ok=True)
        suffix = ".xdr.zstd" if legacy_suffix(index) else ".xdr.zst"
        path = folder / batch_name(batch_start, batch_end, suffix)
        path.write_bytes(compress(batch_bytes(batch_start, batch_end, metas), streaming=streaming(index)))
        archive.files.append(path)
        for ledger in built:
            ledger.path = path
            archive.ledgers[ledger.sequence] = ledger
        batch_start = batch_end + 1
        index += 1
    return archive


def ledger_range_request(
    records: list[dict[str, Any]],
    *,
    run_id: str,
    dataset: str,
    first: int,
    end: int,
    partition_size: int,
    version_label: str = "v1",
) -> dict[str, Any]:
    """A `ledgerRange` backfill request carrying `records` inline (consent required)."""
    return {
        "runId": run_id,
        "dataset": dataset,
        "versionLabel": version_label,
        "ledgerRange": {
            "field": "ledgerSequence",
            "first": first,
            "end": end,
            "partitionSize": partition_size,
        },
        "policies": {"requireConsent": True},
        "sourceRecords": records,
    }


def write_large_ledger(root: Path, sequence: int, code_bytes: int) -> Path:
    """Write one batch file holding ledger `sequence` alone, a valid v0 LedgerCloseMeta whose
    upgrade meta creates a contract code entry of `code_bytes` zero bytes (XDR has no bound on it):
    a few KiB on disk however large it decompresses to, streamed, so the XDR is never held here."""
    meta, _ = ledger_close_meta(sequence, hashlib.sha256(b"genesis-%d" % sequence).digest())
    marker = b"MARKER-CODE-ENTRY"
    code = x.ContractCodeEntry(ext=x.ContractCodeEntryExt(v=0), hash=_hash(bytes(32)), code=marker)
    entry = x.LedgerEntry(
        last_modified_ledger_seq=x.Uint32(sequence),
        data=x.LedgerEntryData(type=x.LedgerEntryType.CONTRACT_CODE, contract_code=code),
        ext=x.LedgerEntryExt(v=0),
    )
    change = x.LedgerEntryChange(type=x.LedgerEntryChangeType.LEDGER_ENTRY_CREATED, created=entry)
    upgrade = x.LedgerUpgrade(
        type=x.LedgerUpgradeType.LEDGER_UPGRADE_VERSION, new_ledger_version=x.Uint32(PROTOCOL)
    )
    assert meta.v0 is not None
    meta.v0.upgrades_processing = [x.UpgradeEntryMeta(upgrade, x.LedgerEntryChanges([change]))]
    data = batch_bytes(sequence, sequence, [meta])
    at = data.index(len(marker).to_bytes(4, "big") + marker)  # the code's length, its bytes, padding
    after = at + 4 + (len(marker) + 3) // 4 * 4
    root.mkdir(parents=True, exist_ok=True)
    path = root / batch_name(sequence, sequence)
    with path.open("wb") as file, zstandard.ZstdCompressor().stream_writer(file, closefd=False) as out:
        out.write(data[:at] + code_bytes.to_bytes(4, "big"))
        zeros, left = bytes(1 << 20), code_bytes + (-code_bytes) % 4
        while left:
            out.write(zeros[: min(left, len(zeros))])
            left -= min(left, len(zeros))
        out.write(data[after:])
    return path


def zstd_bomb(size: int) -> bytes:
    """One zstd frame (no content size, a 1 MiB window) of `size` zero bytes, a multiple of 128 KiB,
    as run-length blocks: 4 bytes of file for every 128 KiB it decompresses to."""
    block = 1 << 17
    assert size % block == 0 and size
    blocks = [
        (int(k == size // block - 1) | 1 << 1 | block << 3).to_bytes(3, "little") + b"\0"
        for k in range(size // block)
    ]
    return b"\x28\xb5\x2f\xfd" + b"\x00\x50" + b"".join(blocks)  # magic; no content size; window 2^20
