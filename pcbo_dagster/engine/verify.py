"""`verify`: derive from the audit chains what must be true, then check every store against it.

The lake, the catalog and the audit backup are all treated as writable by someone who wants a forged
history to pass. So nothing is taken from one store on its own word:

1. **The chains.** Every chain of the audit backup is verified offline (each hash recomputed, each
   link), then replayed from seq 0 (`core/chain_state.py`): per partition, every version committed,
   which one is current after the commits and rollbacks, and any intent still open. The catalog's
   mirror must hold the same events: each stored `event_json` is re-hashed (not only its stored hash
   column), its columns must agree with it, and `audit_chain_heads` must name the last event.
2. **The lake against the chains.** Each partition's commit point must be exactly the manifest the
   chain says is current (`engine/crash_windows.py`: a downgrade, a forged, copied or deleted
   manifest, a rolled-back version made visible again are each reported by name). The current
   version is re-read in full (files, checksums, rows, Merkle root, policy). Every version the chain
   committed must still have the version manifest it committed (`_versions/`), and its rollback
   manifest (`_rollback/`) must say exactly what the chain implies (the version it restores, the
   files it removes); every version a rollback could restore must have intact data files.
3. **The catalog against the chains.** Partition rows (checksum, root, counts, files, event hash,
   status), run rows (plan and decision hashes of the events naming the run), lineage rows, rollout
   rows (status, staged decisions, time and window, by the rollout's lifecycle events:
   `core/rollout_lifecycle.py`) and soak evaluation rows (each must be a `rollout_soak_evaluated`
   event; with the operator's key, only lifecycle events it signed count, and any other is
   `rollout_event_signature_invalid`; so do only table declarations it signed, any other being
   `table_declaration_signature_invalid`), and the append-only triggers (a dropped one is a finding).
4. **The transparency logs.** The catalog's stored log of each chain must be the log of the backup's
   events, and every stored or lake checkpoint must have the root of the backup's first `size` events
   (`engine/transparency_log.py`). With a checkpoint an auditor holds (`trusted`), the chain must
   extend it: what it covers was neither rewritten nor truncated, whatever the stores say.

`repair=True` heals exactly the crash windows of the commit protocol: a commit or rollback whose
intent is on the chain and whose lake state is exactly the one the intent names (the missing event
and catalog rows are appended), and a catalog row missing for the chain's current version. Anything
else stays a finding, with a note that repair refuses it. A second `repair` appends nothing.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import struct
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pcbo_dagster.audit.backup import AuditBackupCorrupt
from pcbo_dagster.audit.delivery import checked_cursor
from pcbo_dagster.audit.log import ChainDivergence, ChainMoved
from pcbo_dagster.catalog.partitions import PartitionVersionRow
from pcbo_dagster.catalog.rollouts import RolloutStore
from pcbo_dagster.core.audit_chain import event_hash, split_chain_key, verify_chain
from pcbo_dagster.core.canonical import prefixed, sha256_hex
from pcbo_dagster.core.chain_state import (
    TABLE_PUBLICATION_RECORDED,
    ChainState,
    CommitIntent,
    PartitionHistory,
    RollbackIntent,
    replay,
)
from pcbo_dagster.core.checkpoints import Checkpoint, chain_of_origin
from pcbo_dagster.core.compliance import violations
from pcbo_dagster.core.instants import parse_instant, to_datetime
from pcbo_dagster.core.ledger_links import LedgerAnchor, LedgerLinks
from pcbo_dagster.core.operator_signatures import verified_statement, writer_refusal
from pcbo_dagster.core.partition_keys import PartitionKeyError, parse_ledger_key
from pcbo_dagster.core.plan import NormalizedPolicies
from pcbo_dagster.core.request_model import MAX_JSON_DEPTH, nested_deeper_than
from pcbo_dagster.core.rollout_lifecycle import (
    LIFECYCLE_EVENTS,
    approval_events_without_row,
    approval_row_disagreements,
    lifecycle,
    row_catch_up,
    row_disagreements,
    soak_detail_of_event,
    soak_events_without_row,
    soak_rows_on_chain,
)
from pcbo_dagster.core.signed_approvals import APPROVAL_EVENTS, approval_of_event, statement_of
from pcbo_dagster.core.signed_note import Note, NoteError, VerifierKey, parse_verifier_key
from pcbo_dagster.engine import lake_changes
from pcbo_dagster.engine.crash_windows import (
    LakeVsChain,
    catalog_lag,
    compare,
    heal,
    heal_catalog_lag,
    record_version_from_chain,
)
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.partition_checks import distrusted, read_chain
from pcbo_dagster.engine.partition_reading import read_partition
from pcbo_dagster.engine.transparency_log import (
    check_against_checkpoint,
    check_stored_logs,
    publish,
)
from pcbo_dagster.lake import layout, manifests
from pcbo_dagster.tables.iceberg_publication import check_tables

REFUSED = "not a crash window of the commit protocol: verify --repair refuses to touch it"
HELD_BACK = (
    "verify --repair refuses to heal it: the chain does not extend the checkpoint given (rewritten or "
    "cut back, what looks like a crash window may be forged)"
)
NOT_VERIFIED = (
    "verify --repair refuses to heal it: the audit chain does not verify (an event edited, or not the "
    "history its stored transparency log holds: what looks like a crash window may be forged)"
)


class _Report:
    def __init__(self, repair: bool) -> None:
        #: Healing this chain's crash windows (not when it is held back).
        self.repair = repair
        #: `verify --repair`: every finding says repair refuses it.
        self.repairing = repair
        self.findings: list[dict[str, Any]] = []
        self.repaired: list[dict[str, Any]] = []
        #: Repairing, but not this chain: why (`HELD_BACK`, `NOT_VERIFIED`, `writer_refusal`'s), else None.
        self.held_back: str | None = None
        #: Crash windows the chain shows still open that nothing in the stores contradicts (not
        #: findings: no store was tampered with; `_pending_commit`).
        self.pending: list[dict[str, Any]] = []

    def find(self, kind: str, where: str, detail: str) -> None:
        if self.repairing:
            detail = f"{detail} ({REFUSED})"
        self.findings.append({"kind": kind, "where": where, "detail": detail})

    def healable(self, kind: str, where: str, detail: str) -> None:
        """A finding `--repair` heals (reported as found when not repairing)."""
        if self.held_back:
            detail = f"{detail}; {self.held_back}"
        self.findings.append({"kind": kind, "where": where, "detail": detail})


@dataclass(frozen=True)
class TrustedCheckpoint:
    """A checkpoint an auditor holds (verified under the operator's key), and the witness
    cosignatures they require on it."""

    checkpoint: Checkpoint
    note: Note
    witness_keys: list[VerifierKey]
    min_witnesses: int = 0


def verify(
    env: Environment,
    repair: bool = False,
    trusted: TrustedCheckpoint | None = None,
    anchors: Sequence[LedgerAnchor] = (),
) -> dict[str, Any]:
    """Check every store against the chains (module doc). With `repair`, under the write lock of every
    dataset version the stores know (waiting, as a run does, for runs under way): a live run's commit,
    its intent appended and its commit point written, looks exactly like a crash window, and healing
    it beside the run would record that commit twice. `anchors`: ledgers whose hashes the auditor
    trusts (`_check_anchors`)."""
    if not repair:
        return _verify(env, False, trusted, anchors)
    with contextlib.ExitStack() as locks:
        for dataset, version_label in _dataset_versions(env):
            locks.enter_context(env.dataset_lock(dataset, version_label))
        return _verify(env, True, trusted, anchors)


def _dataset_versions(env: Environment) -> list[tuple[str, str]]:
    """Every dataset version whose chain the audit backup or the catalog's heads hold, in order (what
    repair may append to; a catalog `datasets` row alone, which anyone who can write the catalog may
    add, locks nothing)."""
    keys = set(env.audit.backup.chain_keys()) | set(env.catalog.chain_heads())
    found = []
    for key in sorted(keys):
        try:
            found.append(split_chain_key(key))
        except ValueError:
            continue  # reported by the checks, never repaired
    return found


def _verify(
    env: Environment, repair: bool, trusted: TrustedCheckpoint | None, anchors: Sequence[LedgerAnchor]
) -> dict[str, Any]:
    report = _Report(repair)
    links_of: dict[str, LedgerLinks] = {}
    # (before the stores are reconciled: a pending batch of such a chain is not adopted either)
    not_extending = _not_extending(env, trusted) if repair else set()
    if repair:
        _reconcile_stores(env, report, not_extending)
    backup_chains, problems = env.audit.backup.read_all_with_problems()
    for problem in problems:
        report.find("audit_backup_unreadable", "audit backup", problem)
    for ckey, fragments in env.audit.backup.set_aside_fragments().items():
        report.find(
            "audit_backup_torn_fragment",
            ckey,
            f"{len(fragments.splitlines())} torn fragment(s), no event of the chain, were set aside "
            f"in the backup's {ckey}.torn file",
        )
    heads = env.catalog.chain_heads()

    lake_keys: dict[str, set[str]] = defaultdict(set)
    for rel in env.lake.find(layout.MANIFEST):
        parts = layout.split_manifest_path(rel)
        if parts is None:
            report.find("lake_path_unexpected", rel, "a commit point outside <dataset>/<versionLabel>/<key>/")
            continue
        lake_keys[f"{parts[0]}/{parts[1]}"].add(parts[2])
    catalog_chains = {f"{d['dataset']}/{d['version_label']}" for d in env.catalog.datasets()}

    checked_partitions = 0
    chains_checked: dict[str, int] = {}
    held_back: dict[str, str] = {}
    #: Chains held back because this process may not append to them (`writer_refusal`): sound chains
    #: this process cannot heal, whose crash windows (`healable` findings) say why.
    unwritable: set[str] = set()
    if repair:  # (and as the backup holds it now)
        held_back = dict.fromkeys(not_extending | _not_extending(env, trusted, backup_chains), HELD_BACK)
    for ckey in sorted(set(backup_chains) | set(heads) | set(lake_keys) | catalog_chains):
        try:
            dataset, version_label = split_chain_key(ckey)
        except ValueError as exc:
            report.repair, report.held_back = False, None
            report.find("audit_chain_broken", ckey, str(exc))
            continue
        # A chain that does not extend the checkpoint the auditor holds was rewritten or cut back, and
        # one that does not verify was edited: what looks like a crash window in it may be a forgery
        # (a chain cut to just after an intent whose commit points are in the lake, a commit event
        # edited into another type), so nothing of it is healed (its findings say why).
        if (
            repair
            and ckey not in held_back
            and distrusted(env, read_chain(env, dataset, version_label), ckey)
        ):
            held_back[ckey] = NOT_VERIFIED
        elif repair and ckey not in held_back:
            refusal = writer_refusal(backup_chains.get(ckey, []), env.operator_verifier)
            if refusal is not None:
                held_back[ckey] = f"verify --repair refuses to heal it: {refusal}"
                unwritable.add(ckey)
        report.repair = repair and ckey not in held_back
        report.held_back = held_back.get(ckey)
        events = backup_chains.get(ckey, [])
        _check_chain(env, report, ckey, events, heads.get(ckey))
        state = replay(events)
        for text in state.findings:
            report.find("audit_chain_inconsistent", ckey, text)
        links_of[ckey] = LedgerLinks(
            watch=frozenset(
                a.sequence for a in anchors if (a.dataset, a.version_label) == (dataset, version_label)
            ),
            derives=_ledgers_their_xdr_gives,
        )
        checked_partitions += _check_lake(
            env, report, state, dataset, version_label, lake_keys.get(ckey, set()), links_of[ckey]
        )
        try:
            _check_catalog(env, report, state, dataset, version_label)
        except (ValueError, TypeError, KeyError, RecursionError) as exc:  # a row of another shape
            report.find(
                "catalog_unreadable",
                ckey,
                f"the catalog's partition rows of {ckey} cannot be read or compared "
                f"({type(exc).__name__}): not the rows pcbo writes",
            )
        _check_tables(env, report, events, state, dataset, version_label)
        # (repairing may have appended events since the backup was read)
        logged = env.audit.backup.read_chain(ckey) if repair else events
        for finding in check_stored_logs(env, ckey, logged):
            report.find(finding["kind"], finding["where"], finding["detail"])
        if state.sql:  # issue 15: the SQL tables the chain names (engine/sql_verify.py)
            from pcbo_dagster.engine.sql_verify import check_sql_targets

            checked_partitions += check_sql_targets(env, report, state, dataset, version_label)
        chains_checked[ckey] = len(events)
    report.repair, report.held_back = repair, None
    _check_operator_signatures(env, report, backup_chains)
    _check_delivery_cursors(env, report, backup_chains)
    _check_rollouts(env, report, backup_chains)
    _check_triggers(env, report)
    document: dict[str, Any] = {}
    if anchors:
        document["trustedLedgers"] = _check_anchors(report, anchors, links_of)
    if trusted is not None:
        chain = chain_of_origin(trusted.checkpoint.origin, env.settings.checkpoint_origin_prefix)
        findings, summary = check_against_checkpoint(
            env,
            trusted.checkpoint,
            trusted.note,
            backup_chains.get(chain or "", []),
            trusted.witness_keys,
            trusted.min_witnesses,
        )
        for finding in findings:
            report.find(finding["kind"], finding["where"], finding["detail"])
        document["trustedCheckpoint"] = summary
    if repair:
        document["checkpoints"] = []
        for ckey in sorted(chains_checked):
            if ckey in unwritable:  # nothing appended, nor a checkpoint signed with another key
                document["checkpoints"].append(None)
                continue
            if ckey in held_back:  # (its findings say why)
                report.find(
                    "transparency_log_not_published",
                    ckey,
                    "no checkpoint signed: the chain does not extend the checkpoint given"
                    if held_back[ckey] == HELD_BACK
                    else "no checkpoint signed: the chain does not verify",
                )
                document["checkpoints"].append(None)
                continue
            try:
                published = publish(env, ckey)["checkpoint"]
            except ValueError as exc:  # the stored log and the chain disagree (reported above)
                report.find("transparency_log_not_published", ckey, f"no checkpoint signed: {exc}")
                document["checkpoints"].append(None)
                continue
            document["checkpoints"].append(published)
            if published is not None:
                _rewritten_checkpoint_file(report, ckey, published["treeSize"])
    _announce_repairs(env, report.repaired)

    return {
        "status": "clean" if not report.findings else "findings",
        "findings": report.findings,
        "repaired": report.repaired,
        "pending": report.pending,
        "checked": {"partitions": checked_partitions, "chains": chains_checked},
        **document,
    }


def _rewritten_checkpoint_file(report: _Report, ckey: str, size: int) -> None:
    """`publish` writes the log's newest checkpoint to its lake file from the catalog's row (of the
    log's root) whenever the file holds anything else: a file found holding another checkpoint, or none,
    is then repaired, not refused. (What is found of the row itself stays a finding.)"""
    rel = layout.checkpoint_file(*split_chain_key(ckey), size)
    kinds = ("checkpoint_file_mismatch", "checkpoint_unreadable")
    stale = [f for f in report.findings if f["where"] == rel and f["kind"] in kinds]
    if stale:
        report.findings = [f for f in report.findings if f not in stale]
        report.repaired.append({"kind": "checkpoint_file_rewritten", "where": rel})


def _not_extending(
    env: Environment, trusted: TrustedCheckpoint | None, backup_chains: dict[str, list[dict]] | None = None
) -> set[str]:
    """The chain a held checkpoint names when the backup's chain (read from `backup_chains`, else from
    the backup) does not extend it (`repair` heals nothing there)."""
    if trusted is None:
        return set()
    chain = chain_of_origin(trusted.checkpoint.origin, env.settings.checkpoint_origin_prefix)
    if chain is None:
        return set()
    events = env.audit.backup.read_chain(chain) if backup_chains is None else backup_chains.get(chain, [])
    findings, _ = check_against_checkpoint(env, trusted.checkpoint, trusted.note, events, [], 0)
    return {chain} if findings else set()


def _announce_repairs(env: Environment, repaired: list[dict[str, Any]]) -> None:
    """Tell the lake-change listeners (`engine/lake_changes.py`) which partitions were repaired."""
    by_chain: dict[tuple[str, str], list[str]] = defaultdict(list)
    for entry in repaired:
        parts = str(entry.get("where", "")).split("/")
        if len(parts) == 3:
            by_chain[(parts[0], parts[1])].append(parts[2])
    for (dataset, version_label), keys in sorted(by_chain.items()):
        lake_changes.announce(env, dataset, version_label, keys, lake_changes.REPAIRED)


# -- 1. the chains ------------------------------------------------------------------------------------


def _reconcile_stores(env: Environment, report: _Report, held_back: set[str]) -> None:
    """Repair: complete the batches a crash left between the backup and the catalog (the audit log's
    own crash window; `audit/log.py`), and nothing else; nothing of a `held_back` chain (one that does
    not extend the checkpoint given: its stores' difference is reported by `_check_chain`)."""
    for ckey in sorted(set(env.audit.backup.chain_keys()) | set(env.catalog.chain_heads())):
        if ckey in held_back:
            continue
        try:
            result = env.audit.sync_to_catalog(ckey)
        except ChainDivergence as exc:
            report.find("audit_stores_diverge", ckey, str(exc))
            continue
        if result.to_head_store or result.to_backup:
            report.repaired.append(
                {
                    "kind": "audit_pending_batch_completed",
                    "where": ckey,
                    "detail": f"{result.to_head_store} event(s) of a pending batch adopted",
                }
            )


def _check_chain(
    env: Environment, report: _Report, ckey: str, events: list[dict], head: tuple[int, str] | None
) -> None:
    for text in verify_chain(events, ckey):
        report.find("audit_chain_broken", ckey, text)
    rows = env.catalog.audit_event_rows(ckey)
    for row in rows:
        where = f"{ckey} seq {row['seq']}"
        try:
            raw = row["event_json"].encode("utf-8")
            if nested_deeper_than(raw, MAX_JSON_DEPTH):
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            stored = json.loads(raw)
            recomputed = event_hash(stored)
        except (ValueError, TypeError, RecursionError) as exc:
            report.find(
                "audit_catalog_event_altered", where, f"the catalog's event_json does not parse: {exc}"
            )
            continue
        chain = stored.get("chain", {}) if isinstance(stored, dict) else {}
        columns = (row["seq"], row["event_hash"], row["prev_event_hash"], row["event_type"])
        own = (
            chain.get("seq"),
            chain.get("event_hash"),
            chain.get("prev_event_hash"),
            stored.get("event_type"),
        )
        if recomputed != chain.get("event_hash") or columns != own:
            report.find(
                "audit_catalog_event_altered",
                where,
                "the catalog's copy of the event does not hash to its event_hash, "
                "or its columns disagree with it",
            )
    backup_hashes = [e.get("chain", {}).get("event_hash") if isinstance(e, dict) else None for e in events]
    mirror_hashes = [r["event_hash"] for r in rows]
    common = min(len(backup_hashes), len(mirror_hashes))
    if backup_hashes[:common] != mirror_hashes[:common]:
        report.find(
            "audit_catalog_mismatch", ckey, "the catalog's copy of the chain differs from the local backup"
        )
    elif len(mirror_hashes) > len(backup_hashes):
        report.find(
            "audit_catalog_mismatch",
            ckey,
            f"the catalog holds {len(mirror_hashes)} events, the local backup {len(backup_hashes)}: events "
            "one store alone holds are not adopted",
        )
    elif len(mirror_hashes) < len(backup_hashes):
        (report.healable if report.held_back else report.find)(  # (a pending batch not adopted)
            "audit_catalog_behind",
            ckey,
            f"the catalog holds {len(mirror_hashes)} of the local backup's {len(backup_hashes)} events",
        )
    expected_head = (len(events) - 1, backup_hashes[-1]) if events else None
    if len(mirror_hashes) == len(backup_hashes) and head != expected_head:
        report.find(
            "audit_head_mismatch", ckey, f"audit_chain_heads says {head}, the chain ends at {expected_head}"
        )


# -- 2. the lake against the chains ---------------------------------------------------------------------


def _check_lake(
    env: Environment,
    report: _Report,
    state: ChainState,
    dataset: str,
    version_label: str,
    lake_keys: set[str],
    links: LedgerLinks,
) -> int:
    """Compare every partition the lake or the chain knows; returns how many commit points were read.
    `links` gathers a ledger dataset's history, across its partitions."""
    chain_keys = {
        k for k, h in state.partitions.items() if h.current is not None or h.open_intent is not None
    }
    checked = 0
    links.shared = LedgerLinks.shared_ranges(_ledger_ranges(lake_keys | chain_keys))
    for key in sorted(lake_keys | chain_keys):
        where = f"{dataset}/{version_label}/{key}"
        try:
            layout.check_partition(dataset, version_label, key)
        except layout.OutsidePartition as exc:
            report.find("lake_path_unexpected", where, str(exc))
            continue
        history = state.get(key)
        try:
            checked += _check_partition(env, report, state, dataset, version_label, key, history, links)
        except layout.OutsidePartition as exc:
            report.find("path_outside_lake", where, str(exc))
    for where, detail in links.breaks():
        report.find("ledger_link_broken", where, detail)
    return checked


#: The columns of a ledger's record (`sources/ledger_decoding.ledger_record`) a row's XDR must give.
_DERIVED = (
    "id",
    "ledgerSequence",
    "ledgerHash",
    "previousLedgerHash",
    "protocolVersion",
    "transactionCount",
    "operationCount",
    "lcmXdrSha256",
)


def _ledgers_their_xdr_gives(table: Any) -> list[bool]:
    """For each row of a ledger table: its `lcmXdrBase64` walks, as a ledger archive's is (the header's
    hash, the transaction set and results it names: `ledger_decoding.decode_batch`), to the record
    its other columns hold (`--trusted-ledger`: a ledger hash and link count only when the ledger's
    own bytes give them)."""
    import pyarrow as pa

    from pcbo_dagster.sources.ledger_decoding import decode_batch, ledger_record

    names = set(table.column_names)
    if "lcmXdrBase64" not in names or not pa.types.is_string(table["lcmXdrBase64"].type):
        return [False] * table.num_rows
    columns = {name: table[name].to_pylist() for name in (*_DERIVED, "lcmXdrBase64") if name in names}
    occurred = None
    if "occurredAt" in names and pa.types.is_timestamp(table["occurredAt"].type):
        occurred = table["occurredAt"].cast(pa.timestamp("us", "UTC")).cast(pa.int64()).to_pylist()
    derived = []
    for i, sequence in enumerate(columns["ledgerSequence"]):
        try:
            xdr = base64.b64decode(columns["lcmXdrBase64"][i], validate=True)
            batch = struct.pack(">III", sequence, sequence, 1) + xdr
        except (TypeError, ValueError, struct.error):
            derived.append(False)
            continue
        decoded, error = decode_batch(batch, "", sequence, sequence, sequence, sequence + 1)
        if error is not None or len(decoded) != 1:
            derived.append(False)
            continue
        record = ledger_record(decoded[0])
        derived.append(
            all(columns[name][i] == record[name] for name in columns if name != "lcmXdrBase64")
            and (occurred is None or occurred[i] == decoded[0].close_time * 1_000_000)
        )
    return derived


def _ledger_ranges(keys: set[str]) -> list[tuple[int, int]]:
    """(first, last) of each ledger partition key (`range=FIRST-LAST`) of `keys`."""
    ranges = []
    for key in keys:
        with contextlib.suppress(PartitionKeyError):
            ranges.append(parse_ledger_key(key))
    return ranges


def _check_anchors(
    report: _Report, anchors: Sequence[LedgerAnchor], links_of: dict[str, LedgerLinks]
) -> list[dict[str, Any]]:
    """Each ledger the auditor trusts against the lake's current partitions the chain vouches for:
    its hash there must be the trusted one (else `ledger_not_trusted`); then the ledgers linked up to
    it without a gap or a broken link (`anchored`, first and last) are the network's."""
    summaries = []
    for anchor in anchors:
        ckey = f"{anchor.dataset}/{anchor.version_label}"
        links = links_of.get(ckey)
        copies = links.copies_of.get(anchor.sequence, []) if links is not None else []
        summary: dict[str, Any] = {
            "dataset": anchor.dataset,
            "versionLabel": anchor.version_label,
            "sequence": anchor.sequence,
            "hash": anchor.hash,
            "anchored": None,
        }
        if not copies:
            report.find(
                "ledger_not_trusted",
                ckey,
                f"the lake holds no ledger {anchor.sequence} in a current partition its chain vouches for, "
                "as its XDR gives it (lcmXdrBase64)",
            )
        others = sorted({(held, where) for held, where, _ in copies if held != anchor.hash})
        for held, where in others:  # (every copy: partitions of differently partitioned runs overlap)
            report.find(
                "ledger_not_trusted",
                ckey,
                f"ledger {anchor.sequence}'s hash in the lake is {held}, not the trusted {anchor.hash} "
                f"(in {where}): the lake does not hold that ledger history",
            )
        if copies and not others:
            assert links is not None
            span = links.anchored(anchor.sequence, anchor.hash)
            if span is not None:
                summary["anchored"] = {"first": span[0], "last": span[1]}
        summaries.append(summary)
    return summaries


def _check_partition(
    env: Environment,
    report: _Report,
    state: ChainState,
    dataset: str,
    version_label: str,
    key: str,
    history: PartitionHistory | None,
    links: LedgerLinks | None = None,
) -> bool:
    """One partition against its chain; True when it has a commit point. `links`: where the ledgers
    of a current partition the chain vouches for are added."""
    where = f"{dataset}/{version_label}/{key}"
    manifest_bytes = env.lake.read_if_exists(layout.manifest(dataset, version_label, key))
    comparison = compare(history, dataset, version_label, key, manifest_bytes)
    if comparison.verdict == "finding":
        assert comparison.kind is not None
        report.find(comparison.kind, where, comparison.detail)
        if comparison.manifest is not None:  # say what else is wrong with it
            _check_current(env, report, dataset, version_label, key)
        return manifest_bytes is not None
    if comparison.healable:
        assert history is not None
        if not _heal(env, report, state, dataset, version_label, history, comparison):
            if not report.repair and manifest_bytes is not None:
                # the commit point is the one the open intent names: its files are checked as any
                # commit point's, so an altered one shows before a repair completes the window
                _check_current(env, report, dataset, version_label, key)
            return manifest_bytes is not None
    intent = history.open_intent if history is not None else None
    if comparison.verdict == "agrees" and isinstance(intent, CommitIntent):
        _pending_commit(report, where, intent)
    if (
        comparison.verdict == "agrees"
        and isinstance(intent, RollbackIntent)
        and intent.manifest_checksum == comparison.manifest_checksum
    ):
        _complete_rollback(env, report, state, dataset, version_label, key, intent)
        manifest_bytes = env.lake.read_if_exists(layout.manifest(dataset, version_label, key))
    if manifest_bytes is not None:
        _check_current(env, report, dataset, version_label, key, links)
    if history is not None:
        _check_versions(env, report, history, dataset, version_label)
    return manifest_bytes is not None


def _pending_commit(report: _Report, where: str, intent: CommitIntent) -> None:
    """A commit intent on the chain with no commit event, and the commit point still the version it was
    to replace: a run stopped (a crash, a kill, a lost lease) after recording its intent and before
    moving the commit point. Derived from the chain alone; not tampering, and nothing to repair (no
    commit point was written: `--repair` cannot complete a commit whose post-write check never ran).
    Re-running the request commits that version (a new intent, then the commit), and any later commit
    or rollback of the partition closes it. Reported, since until then anyone who can write the lake
    can complete it when they choose, by putting its staged `_versions/` manifest in as the commit point
    (which `--repair` or the next run would then heal, checking it as any commit)."""
    report.pending.append(
        {
            "kind": "commit_intent_open",
            "where": where,
            "seq": intent.seq,
            "runId": intent.run_id,
            "version": intent.version,
            "manifestChecksum": intent.manifest_checksum,
            "detail": (
                f"run {intent.run_id!r} recorded its intent to commit version {intent.version} (seq "
                f"{intent.seq}) and stopped before moving the commit point: a crash window, not tampering; "
                "re-running the request (or any later commit or rollback of the partition) closes it"
            ),
        }
    )


def _heal(
    env: Environment,
    report: _Report,
    state: ChainState,
    dataset: str,
    version_label: str,
    history: PartitionHistory,
    comparison: LakeVsChain,
) -> bool:
    """Report or (repairing) heal an interrupted commit or rollback; False when the partition's further
    checks do not apply (not repaired)."""
    where = comparison.where
    missing = "audit_event_missing" if comparison.verdict == "heal_commit" else "rollback_event_missing"
    if not report.repair:
        report.healable(missing, where, f"{comparison.detail} (a crash window: verify --repair completes it)")
        if comparison.verdict == "heal_commit":
            row = env.catalog.current_partition(dataset, version_label, history.key)
            if row is None or row["manifest_checksum"] != comparison.manifest_checksum:
                report.healable(
                    "catalog_mismatch",
                    where,
                    "the catalog's current version is not the lake's committed manifest",
                )
        return False
    try:
        event = heal(env, state, dataset, version_label, comparison)
    except ChainDivergence as exc:  # the stores disagree (found above): nothing is appended to them
        report.find("audit_stores_diverge", where, str(exc))
        return False
    except ChainMoved as exc:  # a writer without the lock (one frozen past its lease) appended since
        report.find("audit_chain_moved", where, str(exc))
        return False
    appended = "audit_event_appended" if comparison.verdict == "heal_commit" else "rollback_event_appended"
    report.repaired.append({"kind": appended, "where": where, "eventHash": event["chain"]["event_hash"]})
    return True


def _complete_rollback(
    env: Environment,
    report: _Report,
    state: ChainState,
    dataset: str,
    version_label: str,
    key: str,
    intent: RollbackIntent,
) -> None:
    """A rollback killed after its intent, before the commit point moved: the lake is still the
    version the intent undoes. Reported (it would otherwise stay open, and a later downgrade of the
    commit point by anyone who can write the lake would be healed as this rollback, at a time of their
    choosing); `--repair` completes it as running the rollback again does (checked like any rollback:
    the version to restore must be the chain's, intact)."""
    from pcbo_dagster.engine.rollback import RollbackRefused, apply_undos, plan_undo

    where = f"{dataset}/{version_label}/{key}"
    detail = (
        f"the rollback of version {intent.version} (seq {intent.seq}) stopped after its intent, before the "
        "commit point moved"
    )
    if not report.repair:
        report.healable(
            "rollback_interrupted", where, f"{detail} (a crash window: verify --repair completes it)"
        )
        return
    try:
        step = plan_undo(env, state, dataset, version_label, key)
    except RollbackRefused as exc:
        report.find(exc.finding["kind"], where, f"{detail}; it cannot be completed: {exc.finding['detail']}")
        return
    if (step.version, step.restore_version) != (intent.version, intent.restore_version):
        report.find("rollback_interrupted", where, f"{detail}; the chain now names another version to undo")
        return
    try:
        [outcome] = apply_undos(
            env,
            state,
            dataset,
            version_label,
            [step],
            reason=intent.reason or "interrupted_rollback_completed",
            run_id=intent.run_id,
        )
    except (ChainDivergence, ChainMoved) as exc:  # the stores disagree (found above): nothing appended
        report.find("audit_stores_diverge", where, f"{detail}; not completed: {exc}")
        return
    report.repaired.append({"kind": "rollback_completed", "where": where, "eventHash": outcome["eventHash"]})


def _check_current(
    env: Environment,
    report: _Report,
    dataset: str,
    version_label: str,
    key: str,
    links: LedgerLinks | None = None,
) -> None:
    reading = read_partition(env.lake, dataset, version_label, key)
    for finding in reading.findings:
        report.find(finding["kind"], finding["where"], finding["detail"])
    if reading.manifest is None:
        return
    readable = [f for f in reading.manifest["files"] if f["path"] not in reading.unreadable]
    try:
        policies = NormalizedPolicies.from_json(reading.manifest["policies"])
    except (KeyError, TypeError, ValueError) as exc:
        report.find("manifest_policies_unreadable", reading.rel, str(exc))
        return
    for table, entry in zip(reading.tables, readable, strict=True):
        for v in violations(table, policies, []):
            report.find("policy_violation", entry["path"], f"row {v['id']!r}: {', '.join(v['reasons'])}")
        if links is not None:
            links.add(table, f"{dataset}/{version_label}/{key}")


def _check_versions(
    env: Environment, report: _Report, history: PartitionHistory, dataset: str, version_label: str
) -> None:
    """Every committed version keeps the manifest the chain committed and a rollback manifest that
    says what the chain implies; every version a rollback could restore keeps intact data files."""
    lake = env.lake
    where = f"{dataset}/{version_label}/{history.key}"
    files: dict[int, list[dict[str, Any]]] = {}
    for version, committed in sorted(history.versions.items()):
        rel = layout.version_manifest(dataset, version_label, history.key, version)
        data = lake.read_if_exists(rel)
        if data is None or manifests.checksum(data) != committed.manifest_checksum:
            kind = "version_manifest_missing" if data is None else "version_manifest_altered"
            report.find(kind, rel, f"not the manifest the chain committed as version {version}")
            continue
        try:
            files[version] = [f for f in manifests.decode(data)["files"]]
            for f in files[version]:
                layout.data_file_path(dataset, version_label, history.key, f.get("path"))
        except (layout.OutsidePartition, ValueError, KeyError, TypeError, AttributeError) as exc:
            report.find("path_outside_partition", rel, str(exc))
            files.pop(version, None)
    for version, committed in sorted(history.versions.items()):
        if version not in files:
            continue
        previous = committed.previous_version
        if previous is not None and previous not in files:
            continue
        kept = {f["path"] for f in files[previous]} if previous is not None else set()
        remove = sorted(f["path"] for f in files[version] if f["path"] not in kept)
        rel = layout.rollback_manifest(dataset, version_label, history.key, version)
        data = lake.read_if_exists(rel)
        if not manifests.rollback_manifest_agrees(
            data, dataset, version_label, history.key, version, committed.manifest_checksum, previous, remove
        ):
            report.find(
                "rollback_manifest_mismatch" if data is not None else "rollback_manifest_missing",
                rel,
                "the rollback manifest does not say what the chain implies (the version it undoes, the one "
                "it restores, the files it removes)",
            )
    # What a rollback could make current: the chain of versions the current one replaced.
    current = history.current_version
    for restorable in history.lineage(current.previous_version if current is not None else None):
        for entry in files.get(restorable, []):
            data = lake.read_if_exists(entry["path"])
            if (
                data is None
                or len(data) != entry.get("byteSize")
                or prefixed(sha256_hex(data)) != entry.get("checksum")
            ):
                report.find(
                    "restorable_version_corrupt",
                    entry["path"],
                    f"a data file of version {restorable} of {where}, which a rollback would restore, "
                    "is missing or differs from its manifest",
                )


# -- 3. the catalog against the chains ---------------------------------------------------------------------


def _expected_status(history: PartitionHistory, version: int) -> str:
    if history.current == version:
        return "committed"
    return "rolled_back" if version in history.undone_versions() else "superseded"


def _check_catalog(
    env: Environment, report: _Report, state: ChainState, dataset: str, version_label: str
) -> None:
    catalog = env.catalog
    lagging: dict[str, int] = {}
    if report.repair:
        for key in heal_catalog_lag(env, state, dataset, version_label):
            report.repaired.append(
                {"kind": "catalog_row_rolled_back", "where": f"{dataset}/{version_label}/{key}"}
            )
    else:
        lagging = catalog_lag(env, state, dataset, version_label)
    rows_by_key: dict[str, dict[int, PartitionVersionRow]] = defaultdict(dict)
    for row in catalog.partition_versions(dataset, version_label):
        rows_by_key[row["partition_key"]][row["version"]] = row
    for key in sorted(set(rows_by_key) | set(state.partitions)):
        where = f"{dataset}/{version_label}/{key}"
        history = state.get(key)
        rows = rows_by_key.get(key, {})
        # A crash after the current version's event, before its catalog row: the version it replaced
        # still says `committed`. That is the same crash window (recording the current version
        # supersedes it), not a disagreement of its own.
        current_row_missing = (
            history is not None and history.current is not None and history.current not in rows
        )
        for version, row in sorted(rows.items()):
            committed = history.versions.get(version) if history is not None else None
            if committed is None:
                report.find(
                    "catalog_partition_not_on_chain",
                    where,
                    f"the catalog records version {version}, which the chain never committed",
                )
                continue
            event = committed.event
            tables = {
                name: (t.get("checksum"), t.get("row_count"), t.get("byte_size"))
                for name, t in (event.get("tables") or {}).items()
            }
            row_files = {
                str(f.get("path", "")).rsplit("/", 1)[-1]: (
                    f.get("checksum"),
                    f.get("rowCount"),
                    f.get("byteSize"),
                )
                for f in (row["files"] if isinstance(row["files"], list) else [])
                if isinstance(f, dict)
            }
            differs = [
                name
                for name, ok in (
                    ("manifest_checksum", row["manifest_checksum"] == committed.manifest_checksum),
                    ("merkle_root", row["merkle_root"] == event.get("merkle_root")),
                    ("record_count", row["record_count"] == event.get("record_count")),
                    ("event_hash", row["event_hash"] == committed.event_hash),
                    ("run_id", row["run_id"] == committed.run_id),
                    ("files", row_files == tables),
                    ("status", row["status"] == _expected_status(history, version)),  # type: ignore[arg-type]
                )
                if not ok
            ]
            if (
                current_row_missing
                and differs == ["status"]
                and row["status"] == "committed"
                and history is not None
                and history.current is not None
                and version == history.versions[history.current].previous_version
            ):
                differs = []
            if key in lagging and differs == ["status"]:
                differs = []  # the rollback's catalog step a crash cut off: reported once, below
            if differs:
                kind = (
                    "catalog_mismatch"
                    if version == (history.current if history else None)
                    else "catalog_version_mismatch"
                )
                report.find(
                    kind,
                    where,
                    f"version {version}: the catalog's {', '.join(differs)} "
                    f"{'disagrees' if len(differs) == 1 else 'disagree'} with the chain",
                )
        if key in lagging:
            report.healable(
                "catalog_mismatch",
                where,
                f"the catalog still records version {lagging[key]} as committed; the chain rolled it back "
                "(a crash window: verify --repair marks it)",
            )
        for version in sorted(set(history.versions) - set(rows) - {history.current}) if history else []:
            report.find(
                "catalog_version_missing",
                where,
                f"the chain committed version {version}; the catalog has no row for it",
            )
        if history is not None and history.current is not None and history.current not in rows:
            if report.repair:
                try:
                    record_version_from_chain(env, history, dataset, version_label, history.current)
                except ValueError as exc:
                    report.find("catalog_mismatch", where, str(exc))
                else:
                    report.repaired.append({"kind": "catalog_row_recorded", "where": where})
            else:
                report.healable(
                    "catalog_mismatch",
                    where,
                    f"the catalog has no row for the chain's current version {history.current} "
                    "(a crash window: verify --repair records it)",
                )
    _check_runs(env, report, state, dataset, version_label)


def _check_runs(
    env: Environment, report: _Report, state: ChainState, dataset: str, version_label: str
) -> None:
    ckey = f"{dataset}/{version_label}"
    runs = {r["run_id"]: r for r in env.catalog.runs(dataset, version_label)}
    hashes: dict[str, set[tuple[Any, Any]]] = defaultdict(set)
    for history in state.partitions.values():
        for committed in history.versions.values():
            if committed.run_id is not None:
                hashes[committed.run_id].add(
                    (committed.event.get("plan_hash"), committed.event.get("decision_hash"))
                )
    for run_id in sorted(state.run_ids()):
        row = runs.get(run_id)
        if row is None:
            report.find(
                "catalog_run_missing",
                f"{ckey} run {run_id}",
                "the chain names a run the catalog does not hold",
            )
            continue
        for plan_hash, decision_hash in sorted(hashes.get(run_id, set()), key=str):
            if (row["plan_hash"], row["decision_hash"]) != (plan_hash, decision_hash):
                report.find(
                    "catalog_run_mismatch",
                    f"{ckey} run {run_id}",
                    "the catalog's plan or decision hash of the run differs from its commit events'",
                )
    for lineage in env.catalog.lineage(dataset, version_label):
        where = f"{ckey}/{lineage['partition_key']} version {lineage['partition_version']}"
        lineage_history = state.get(lineage["partition_key"])
        committed_version = (
            None if lineage_history is None else lineage_history.versions.get(lineage["partition_version"])
        )
        run = runs.get(lineage["run_id"])
        if committed_version is None:
            report.find(
                "catalog_lineage_mismatch", where, "lineage names a version the chain never committed"
            )
        elif run is None or (run["plan_hash"], run["decision_hash"]) != (
            lineage["plan_hash"],
            lineage["decision_hash"],
        ):
            report.find(
                "catalog_lineage_mismatch",
                where,
                "lineage names a run, plan or decision hash the catalog's run rows do not hold",
            )
        elif committed_version.run_id == lineage["run_id"] and (
            committed_version.event.get("plan_hash"),
            committed_version.event.get("decision_hash"),
        ) != (lineage["plan_hash"], lineage["decision_hash"]):
            report.find(
                "catalog_lineage_mismatch",
                where,
                "lineage's plan or decision hash differs from the commit event's",
            )


def _check_tables(
    env: Environment, report: _Report, events: list[dict], state: ChainState, dataset: str, version_label: str
) -> None:
    """Issue 17: each Iceberg table the dataset version publishes to lists exactly the files of the
    chain's current versions (`tables/iceberg_publication.py`)."""
    for outcome, entry in check_tables(env, events, state, dataset, version_label, report.repair):
        if outcome == "repaired":
            report.repaired.append(entry)
        elif outcome == "healable":
            report.healable(entry["kind"], entry["where"], entry["detail"])
        else:
            report.find(entry["kind"], entry["where"], entry["detail"])


#: The events pcbo acts on only when the operator's key signed them (with a key configured): the
#: finding an unsigned, altered or repeated one is, and what ignores it.
_SIGNED_EVENTS = {
    **{kind: ("rollout_event_signature_invalid", "the rollout gates ignore it") for kind in LIFECYCLE_EVENTS},
    TABLE_PUBLICATION_RECORDED: (
        "table_declaration_signature_invalid",
        "no run, rollback, repair or query publishes to or reads the table it names",
    ),
}


def _check_operator_signatures(env: Environment, report: _Report, chains: dict[str, list[dict]]) -> None:
    """With the operator's key, each event pcbo acts on only when that key signed it (the rollout
    lifecycle, the table declarations: `core/operator_signatures.py`) must carry its signature, each
    signed statement once: every other one is reported. Without a key nothing is checked."""
    verifier = env.operator_verifier
    if verifier is None:
        return
    for ckey, events in sorted(chains.items()):
        seen: dict[str, Any] = {}  # signed statement -> the seq it first stands at
        for event in events:
            finding = _SIGNED_EVENTS.get(str(event.get("event_type")))
            if finding is None:
                continue
            seq = event.get("chain", {}).get("seq")
            statement = verified_statement(event, verifier)
            if statement is None:
                detail = "carries no valid signature of the operator's key"
            elif statement in seen:
                detail = f"repeats the signed statement of seq {seen[statement]} (each counts once)"
            else:
                seen[statement] = seq
                continue
            kind, consequence = finding
            report.find(
                kind, f"{ckey} seq {seq}", f"the {event.get('event_type')} event {detail}: {consequence}"
            )


def _check_delivery_cursors(env: Environment, report: _Report, chains: dict[str, list[dict]]) -> None:
    """Each chain's delivery cursor (`audit/delivery.py`) must name an event the backup holds at its
    seq and, with the operator's key, be signed by it over that place: any other was written by someone
    who can write the audit backup (to make delivery skip events, which it no longer does: the next
    delivery starts again from seq 0). A cursor that is no regular file is `audit_backup_unreadable`."""
    verifier = env.operator_verifier
    for ckey, events in sorted(chains.items()):
        try:
            _, problem = checked_cursor(env.audit.backup, ckey, events, verifier)
        except (AuditBackupCorrupt, OSError):
            continue  # (reported as audit_backup_unreadable)
        if problem is not None:
            report.find(
                "delivery_cursor_forged",
                ckey,
                f"{problem}: someone who can write the audit backup wrote it (or pcbo, before the "
                "operator's key was set); the next delivery to the audit endpoint starts again from seq 0",
            )


def _check_rollouts(env: Environment, report: _Report, chains: dict[str, list[dict]]) -> None:
    """Each rollout row of the catalog, and each of its soak evaluation rows, against its lifecycle on
    the dataset version's chain (the promotion gate reads the chain; a row that disagrees opens
    nothing, and is reported here). With the operator's key, only the lifecycle events it signed
    count (`_check_operator_signatures` reports the others)."""
    verifier = env.operator_verifier
    ignored: set[tuple[str, Any]] = set()  # (chain key, seq) of the decisions the gate ignores
    for ckey, events in sorted(chains.items()):
        ignored |= {(ckey, seq) for seq in _check_approval_statements(report, ckey, events)}
    store = RolloutStore(env.catalog)
    for row in store.list():
        ckey = f"{row['dataset']}/{row['version_label']}"
        events = chains.get(ckey, [])
        life = lifecycle(events, row["name"], verifier)
        where = f"{ckey} rollout {row['name']}"
        disagreements = row_disagreements(life, row)
        # A crash between a lifecycle event and its row leaves the row one step behind a chain that
        # verifies, one in both stores (no audit finding on it: an event the backup alone holds is
        # never adopted): --repair writes the row the step would have (anything else is refused).
        sound = not verify_chain(events, ckey) and not any(
            f["kind"].startswith("audit_") and f["where"].split(" ")[0] == ckey for f in report.findings
        )
        catch_up = row_catch_up(events, row, verifier) if disagreements and sound else None
        if catch_up is not None and report.repair:
            status = catch_up.pop("status")
            store.set_status(
                row["name"],
                status,
                actor="pcbo verify --repair",
                detail={"repaired": "the row was one lifecycle step behind the production audit chain"},
                **catch_up,
            )
            report.repaired.append({"kind": "rollout_row_behind_chain", "where": where, "status": status})
            disagreements = []
        for detail in disagreements:
            if catch_up is not None:
                report.healable(
                    "rollout_not_on_chain", where, f"{detail} (one lifecycle step behind: --repair)"
                )
            else:
                report.find("rollout_not_on_chain", where, detail)
        evaluations = store.soak_evaluations(row["name"])
        for detail in soak_rows_on_chain(life, evaluations)[1]:
            report.find("soak_evaluation_not_on_chain", where, detail)
        for evaluated in soak_events_without_row(life, evaluations):
            _soak_row_missing(report, store, row["name"], where, evaluated, sound)
        approvals = store.approvals(row["name"])
        for detail in approval_row_disagreements(events, row["name"], approvals):
            report.find("rollout_approval_not_on_chain", where, detail)
        for decided in approval_events_without_row(events, row["name"], approvals):
            if (ckey, decided.get("chain", {}).get("seq")) not in ignored:  # (those are findings already)
                _approval_row_missing(report, store, row["name"], where, decided, sound)


def _soak_row_missing(
    report: _Report, store: RolloutStore, name: str, where: str, event: Mapping[str, Any], sound: bool
) -> None:
    """A soak evaluation on the chain no `soak_evaluations` row records: a crash between the event and
    its row. On a chain that verifies, an event that carries the evaluation's whole detail (its digest
    the event's `detail_digest`) is written as a row by --repair; an older event (its digest only) or
    a chain that does not verify is a finding only."""
    seq = event.get("chain", {}).get("seq")
    stored = soak_detail_of_event(event)
    moment = parse_instant(event.get("evaluated_at"))
    passed = event.get("passed")
    write = None
    if sound and stored is not None and moment is not None and isinstance(passed, bool):
        at = to_datetime(moment)
        write = functools.partial(store.record_soak_evaluation, name, passed, stored, now=at)
    detail = f"the rollout_soak_evaluated event at seq {seq} has no soak_evaluations row"
    _row_lost(report, "soak_evaluation_row_missing", where, detail, seq, write)


def _approval_row_missing(
    report: _Report, store: RolloutStore, name: str, where: str, event: Mapping[str, Any], sound: bool
) -> None:
    """A decision on the chain no `rollout_approvals` row records: a crash between the event and its
    row. On a chain that verifies, an event whose statement is signed by the key it names and says
    what it says, the first of that statement (the caller passes no other: those the gate ignores are
    `rollout_approval_signature_invalid` already), is written as a row by --repair (the row is a
    listing: the gate reads the chain); on a chain that does not verify it is a finding only."""
    seq = event.get("chain", {}).get("seq")
    try:
        signed = approval_of_event(event, [parse_verifier_key(str(event.get("approver_key")))])
        moment = parse_instant(event.get("timestamp"))
    except NoteError:
        signed, moment = None, None
    write = None
    if sound and signed is not None and moment is not None:
        write = functools.partial(
            store.record_approval,
            name=name,
            decision=signed.decision,
            decision_hash=signed.decision_hash,
            actor=signed.signer.name,
            reason=signed.reason,
            event_hash=str(event["chain"]["event_hash"]),
            now=to_datetime(moment),
        )
    detail = (
        f"the {event.get('event_type')} event at seq {seq} (by {event.get('by')}) has no "
        "rollout_approvals row"
    )
    _row_lost(report, "rollout_approval_row_missing", where, detail, seq, write)


def _row_lost(
    report: _Report, kind: str, where: str, detail: str, seq: Any, write: Callable[[], Any] | None
) -> None:
    """A catalog row a crash between its chain event and the row left unwritten: healed by --repair
    with `write` (it writes the row the event says), a finding only when `write` is None (the event
    cannot be trusted to say it)."""
    if write is None:
        report.find(kind, where, detail)
    elif report.repair:
        write()
        report.repaired.append({"kind": kind, "where": where, "seq": seq})
    else:
        report.healable(kind, where, f"{detail} (a crash between the event and its row: --repair)")


def _check_approval_statements(report: _Report, ckey: str, events: list[dict]) -> list[Any]:
    """Each `rollout_approved` / `rollout_rejected` event of the chain must carry a signed statement
    that verifies under the key the event names (`approver_key`) and says what the event says
    (`approval_of_event`), each statement once. Whether that key is a listed approver's is the gate's
    to judge (verify reads no datasets config): the gate ignores every event reported here, whose
    seqs are returned."""
    reported: list[Any] = []
    seen: dict[tuple[str, ...], Any] = {}  # signed statement -> the seq it first stands at
    for event in events:
        if event.get("event_type") not in APPROVAL_EVENTS:
            continue
        seq = event.get("chain", {}).get("seq")
        try:
            signed = approval_of_event(event, [parse_verifier_key(str(event.get("approver_key")))])
        except NoteError as exc:
            detail = f"carries no statement signed by the key it names that says what it says ({exc})"
        else:
            statement = statement_of(signed)
            if statement not in seen:
                seen[statement] = seq
                continue
            detail = f"repeats the signed statement of seq {seen[statement]} (each counts once)"
        report.find(
            "rollout_approval_signature_invalid",
            f"{ckey} seq {seq}",
            f"the {event.get('event_type')} event {detail}: the promotion gate ignores it",
        )
        reported.append(seq)
    return reported


def _check_triggers(env: Environment, report: _Report) -> None:
    for name, problem in sorted(env.catalog.append_only_trigger_problems().items()):
        if problem == "missing":
            report.find("catalog_trigger_missing", name, "an append-only trigger was dropped")
        elif problem.startswith("missing: "):  # the table's name reaches another relation
            report.find(
                "catalog_trigger_missing",
                name,
                f"{problem.removeprefix('missing: ')}: pcbo's statements reach a relation this "
                "append-only trigger does not guard",
            )
        else:
            report.find(
                "catalog_trigger_altered",
                name,
                f"an append-only trigger was replaced or disabled ({problem}): it may refuse nothing",
            )
