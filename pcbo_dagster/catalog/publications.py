"""`table_publications`: the Iceberg table each dataset version (and branch) is published to."""

from __future__ import annotations

from typing import TypedDict

from sqlalchemy import select

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.catalog.database import Database, insert_ignore
from pcbo_dagster.catalog.runs import register_dataset
from pcbo_dagster.io.clock import utc_now


class TablePublicationRow(TypedDict):
    dataset: str
    version_label: str
    branch: str
    table_format: str
    catalog_url: str
    table_name: str


class TablePublicationRecords(Database):
    """The `table_publications` table (migration 0006)."""

    def record_table_publication(self, row: TablePublicationRow) -> None:
        """Record where a dataset version's branch is published (kept as it is when already there)."""
        with self.write() as conn:
            register_dataset(conn, row["dataset"], row["version_label"])
            insert_ignore(
                conn,
                t.table_publications,
                {**row, "recorded_at": utc_now()},
                ["dataset", "version_label", "branch"],
            )

    def table_publications(
        self, dataset: str | None = None, version_label: str | None = None
    ) -> list[TablePublicationRow]:
        """The recorded publications (of one dataset version when given), in key order."""
        c = t.table_publications.c
        query = select(
            c.dataset, c.version_label, c.branch, c.table_format, c.catalog_url, c.table_name
        ).order_by(c.dataset, c.version_label, c.branch)
        if dataset is not None:
            query = query.where(c.dataset == dataset)
        if version_label is not None:
            query = query.where(c.version_label == version_label)
        with self.read() as conn:
            return [TablePublicationRow(**r._mapping) for r in conn.execute(query)]  # type: ignore[typeddict-item]
