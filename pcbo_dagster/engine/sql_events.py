"""Audit event bodies (PAS, snake_case) of SQL table targets (issue 15); what the chain makes of them
is `core/chain_state.py`'s (`ChainState.sql`).

- `sql_apply_intent`, before a partition's first chunk touches the table: the run, the target table
  and its layout (key, the columns written and their kinds: what a rollback or a verify needs to
  find and compare rows without the request), the plan and decision hashes, the digest of the
  target's settings (a resumed run must have the same), the number of chunks,
  the digest of the partition's outcomes (`[id, outcome, liveDigest]` of each add, as in the SQL
  decisions document) and of its rows (`rows_digest`: `[id, key text, row digest]` of each add), and
  the journal before it — what every chunk checkpoint is checked against before it is believed —
  and `journal_scope` (`first_intent`: the run's journal in the table is keyed by its id and the
  event hash of its first intent into it, `ChainState.sql_journal_key`);
- `sql_partition_applied`, naming its intent's seq: counts (inserted, updated, skipped, refused,
  failed, and the partition's decision counts), the failed rows' digest, the Merkle root over the
  applied ids (RFC 6962, ids sorted bytewise: inserted, updated and equal rows), the journal after
  the partition, and the read-back;
- `sql_rollback_intent` (the applies about to be undone, with their journal digests), then
  `sql_partition_rolled_back` per partition;
- `sql_rollback_script`: the run's rollback script (name, checksum, entries, journal digest).
"""

from __future__ import annotations

from typing import Any

from pcbo_dagster.core.canonical import digest_of
from pcbo_dagster.core.chain_state import JOURNAL_SCOPE
from pcbo_dagster.core.plan import Partition
from pcbo_dagster.engine.events import PRODUCER
from pcbo_dagster.targets.sql_table import SqlTable


def sql_partition_of(dataset: str, version_label: str, partition: Partition) -> dict[str, Any]:
    window = partition.to_json()
    return {
        "dataset": dataset,
        "version_label": version_label,
        "key": window["key"],
        "index": window["index"],
        "start": window["start"],
        "end": window["end"],
    }


def table_layout(table: SqlTable) -> dict[str, Any]:
    """What finding and comparing the table's rows needs (recorded on the chain with each intent)."""
    return {
        "table": table.qualified,
        "dialect": table.dialect,
        "key": [k.column.name for k in table.key],
        "written": [[w.field, w.column.name, w.kind] for w in table.written],
        "freshness_column": table.spec.freshnessColumn,
        "deleted_column": table.spec.deletedColumn,
    }


def apply_intent_body(
    run_id: str,
    table: SqlTable,
    partition: dict[str, Any],
    plan_hash: str,
    decision_hash: str,
    target_digest: str,
    chunks: int,
    outcomes_digest: str,
    rows_digest: str,
    journal_seq: int,
    journal_digest: str,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "target": table.ref,
        "layout": table_layout(table),
        "partition": partition,
        "plan_hash": plan_hash,
        "decision_hash": decision_hash,
        "target_digest": target_digest,
        "chunks": chunks,
        "outcomes_digest": outcomes_digest,
        "rows_digest": rows_digest,
        "journal": {"seq": journal_seq, "digest": journal_digest},
        # the run's journal entries are filed under <runId>@<its first intent's hash>
        "journal_scope": JOURNAL_SCOPE,
        "producer": PRODUCER,
    }


def applied_body(
    intent: dict[str, Any] | Any,
    intent_seq: int,
    counts: dict[str, Any],
    failures: list[dict[str, Any]],
    merkle_root: str,
    record_count: int,
    journal_seq: int,
    journal_digest: str,
    entries: int,
    read_back: dict[str, Any],
) -> dict[str, Any]:
    """The completion of `intent` (its event), from what the chunks' checkpoints say they did."""
    return {
        "run_id": intent["run_id"],
        "target": intent["target"],
        "partition": dict(intent["partition"]),
        "intent_seq": intent_seq,
        "plan_hash": intent["plan_hash"],
        "decision_hash": intent["decision_hash"],
        "merkle_root": merkle_root,
        "record_count": record_count,
        "counts": counts,
        "failures": failures_summary(failures),
        "journal": {"seq": journal_seq, "digest": journal_digest, "entries": entries},
        "read_back": read_back,
        "producer": PRODUCER,
    }


def failures_summary(failures: list[dict[str, Any]]) -> dict[str, Any]:
    """How `sql_partition_applied` records a partition's failed rows: their count and digest."""
    return {"count": len(failures), "digest": digest_of(failures)}


def rollback_intent_body(
    run_id: str, target: str, reason: str, entries: list[dict[str, Any]]
) -> dict[str, Any]:
    return {"run_id": run_id, "target": target, "reason": reason, "partitions": entries, "producer": PRODUCER}


def rolled_back_body(
    run_id: str,
    target: str,
    partition: dict[str, Any],
    intent_seq: int,
    journal_digest: str,
    restored: int,
    reason: str,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "target": target,
        "partition": partition,
        "intent_seq": intent_seq,
        "journal_digest": journal_digest,
        "restored": restored,
        "reason": reason,
        "producer": PRODUCER,
    }


def rollback_script_body(
    run_id: str, target: str, name: str, checksum: str, entries: int, journal_digest: str
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "target": target,
        "script": {"name": name, "checksum": checksum, "entries": entries, "journal_digest": journal_digest},
        "producer": PRODUCER,
    }
