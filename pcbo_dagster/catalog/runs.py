"""Datasets and runs: the registered (dataset, version_label) pairs and one row per run."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, select, update

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.catalog.database import Database, insert_ignore
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.io.clock import utc_now


def register_dataset(conn: Connection, dataset: str, version_label: str) -> None:
    """Register (dataset, version_label) in this transaction if it is new (the rows of runs,
    partitions and leases refer to it)."""
    insert_ignore(
        conn,
        t.datasets,
        {"dataset": dataset, "version_label": version_label, "first_seen_at": utc_now()},
        ["dataset", "version_label"],
    )


def _check_run_id(
    conn: Connection, run_id: str, dataset: str, version_label: str, hashes: tuple[str, str] | None
) -> None:
    row = conn.execute(
        select(t.runs.c.dataset, t.runs.c.version_label, t.runs.c.plan_hash, t.runs.c.decision_hash).where(
            t.runs.c.run_id == run_id
        )
    ).first()
    if row is None:
        return
    if (row[0], row[1]) != (dataset, version_label):
        why = f"{run_id!r} is already the run id of another dataset version's run: choose another runId"
        raise InvalidInput("runId", why)
    if hashes is not None and (row[2], row[3]) != hashes:
        raise InvalidInput(
            "runId",
            f"{run_id!r} is already the run id of another request's run (plan hash {row[2]}, decision "
            f"hash {row[3]}; this request's: {hashes[0]}, {hashes[1]}), whose commit events carry those: "
            "a run repeats only its own request (a source that changed since is another request); "
            "choose another runId",
        )


class RunRecords(Database):
    """The `datasets` and `runs` tables."""

    def ensure_dataset(self, dataset: str, version_label: str) -> None:
        """Register (dataset, version_label) if it is new."""
        with self.write() as conn:
            register_dataset(conn, dataset, version_label)

    def datasets(self) -> list[dict[str, Any]]:
        """All registered (dataset, version_label) rows."""
        with self.read() as conn:
            rows = conn.execute(select(t.datasets).order_by(t.datasets.c.dataset, t.datasets.c.version_label))
            return [dict(r._mapping) for r in rows]

    def start_run(
        self,
        run_id: str,
        dataset: str,
        version_label: str,
        plan_hash: str,
        decision_hash: str,
        metadata: dict[str, Any],
        same_request: bool = True,
    ) -> None:
        """Insert the run as 'running'; a known run_id is set 'running' again (finished_at cleared).
        `InvalidInput` on `runId` when it is the run of another dataset version or, with
        `same_request`, of another request (`check_run_id`)."""
        with self.write() as conn:
            _check_run_id(
                conn, run_id, dataset, version_label, (plan_hash, decision_hash) if same_request else None
            )
            register_dataset(conn, dataset, version_label)
            inserted = insert_ignore(
                conn,
                t.runs,
                {
                    "run_id": run_id,
                    "dataset": dataset,
                    "version_label": version_label,
                    "plan_hash": plan_hash,
                    "decision_hash": decision_hash,
                    "status": "running",
                    "metadata": compact_text(metadata),
                    "started_at": utc_now(),
                    "finished_at": None,
                    "summary": None,
                },
                ["run_id"],
            )
            if not inserted:
                conn.execute(
                    update(t.runs).where(t.runs.c.run_id == run_id).values(status="running", finished_at=None)
                )

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        """Set the run's final status, summary and finished_at (KeyError for an unknown run)."""
        with self.write() as conn:
            result = conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id)
                .values(status=status, summary=compact_text(summary), finished_at=utc_now())
            )
            if result.rowcount != 1:
                raise KeyError(f"unknown run {run_id!r}")

    def check_run_id(
        self, run_id: str, dataset: str, version_label: str, hashes: tuple[str, str] | None = None
    ) -> None:
        """`InvalidInput` on `runId` when `run_id` is already the run of another dataset version: a
        run row belongs to one chain, and an execute of that id would rewrite the other's status and
        summary (and leave its own chain naming a run the catalog does not hold). With `hashes` (the
        request's plan and decision hashes), also when it is the run of another request: the row
        holds one request's hashes, as its commit events do, and another request's commits under
        it would disagree with them. Checked before a run writes anything, and again as `start_run`
        records it."""
        with self.read() as conn:
            _check_run_id(conn, run_id, dataset, version_label, hashes)

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The run row (metadata and summary parsed), or None."""
        with self.read() as conn:
            row = conn.execute(select(t.runs).where(t.runs.c.run_id == run_id)).first()
        return None if row is None else _run_row(row)

    def runs(self, dataset: str | None = None, version_label: str | None = None) -> list[dict[str, Any]]:
        """Run rows (metadata and summary parsed), by run id."""
        stmt = select(t.runs).order_by(t.runs.c.run_id)
        if dataset is not None:
            stmt = stmt.where(t.runs.c.dataset == dataset)
        if version_label is not None:
            stmt = stmt.where(t.runs.c.version_label == version_label)
        with self.read() as conn:
            return [_run_row(r) for r in conn.execute(stmt)]


def _run_row(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    out["metadata"] = json.loads(out["metadata"])
    out["summary"] = None if out["summary"] is None else json.loads(out["summary"])
    return out
