"""SQL target applies (migration 0008): one row per apply or rollback event of a partition of a SQL
table, and every row the database refused. Both tables are append-only; a row is keyed by the audit
event it records, so recording the same event again (a healed crash) adds nothing."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.catalog.database import Database
from pcbo_dagster.catalog.runs import register_dataset
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.io.clock import utc_now


class SqlApplyRecords(Database):
    """The `sql_apply_log` and `sql_row_failures` tables."""

    def record_sql_apply(self, entry: dict[str, Any], failures: list[dict[str, Any]]) -> bool:
        """Record one apply (or rollback) event and its failed rows in one transaction; False when
        the event was already recorded. `entry`: event_hash, kind, dataset, version_label,
        partition_key, run_id, target, intent_seq, counts (a dict), journal_digest, merkle_root;
        `failures`: id, key, code, error per row."""
        now = utc_now()
        with self.write() as conn:
            register_dataset(conn, entry["dataset"], entry["version_label"])
            log = t.sql_apply_log
            if conn.execute(select(log.c.id).where(log.c.event_hash == entry["event_hash"])).first():
                return False  # (an append-only table: its REPLACE guard refuses even ON CONFLICT)
            conn.execute(
                log.insert().values({**entry, "counts": compact_text(entry["counts"]), "recorded_at": now})
            )
            if failures:
                conn.execute(
                    t.sql_row_failures.insert(),
                    [
                        {
                            "event_hash": entry["event_hash"],
                            "dataset": entry["dataset"],
                            "version_label": entry["version_label"],
                            "partition_key": entry["partition_key"],
                            "run_id": entry["run_id"],
                            "target": entry["target"],
                            "record_id": f["id"],
                            "record_key": f["key"],
                            "code": f["code"],
                            "error": f["error"],
                            "recorded_at": now,
                        }
                        for f in failures
                    ],
                )
            return True

    def sql_applies(
        self, dataset: str | None = None, version_label: str | None = None, run_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Apply log rows (counts parsed), oldest first."""
        log = t.sql_apply_log
        stmt = select(log).order_by(log.c.id)
        for column, value in (
            (log.c.dataset, dataset),
            (log.c.version_label, version_label),
            (log.c.run_id, run_id),
        ):
            if value is not None:
                stmt = stmt.where(column == value)
        with self.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        for row in rows:
            row["counts"] = json.loads(row["counts"])
        return rows

    def sql_failures(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Failed rows, oldest first."""
        failures = t.sql_row_failures
        stmt = select(failures).order_by(failures.c.id)
        if run_id is not None:
            stmt = stmt.where(failures.c.run_id == run_id)
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]
