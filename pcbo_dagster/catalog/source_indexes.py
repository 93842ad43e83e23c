"""The zone indexes of streamed sources (`sources/zones.py`), kept in the catalog for every host.

A cache, keyed by the source's identity: rows are only inserted (a second writer of the same key
changes nothing) and may be deleted at any time.
"""

from __future__ import annotations

from sqlalchemy import select

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.catalog.database import Database, insert_ignore
from pcbo_dagster.io.clock import utc_now


class SourceZoneIndexes(Database):
    """The `source_zone_indexes` table (a `sources.zones.ZoneIndexStore`)."""

    def zone_index(self, key: str) -> bytes | None:
        table = t.source_zone_indexes
        with self.read() as conn:
            row = conn.execute(select(table.c.index_json).where(table.c.index_key == key)).first()
        return None if row is None else str(row.index_json).encode("utf-8")

    def save_zone_index(self, key: str, data: bytes) -> None:
        with self.write() as conn:
            insert_ignore(
                conn,
                t.source_zone_indexes,
                {"index_key": key, "index_json": data.decode("utf-8"), "created_at": utc_now()},
                ["index_key"],
            )


class LazyZoneIndexes:
    """The catalog's zone indexes, the catalog opened (and migrated) only when first asked: a run
    whose sources need no index never touches the catalog here."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._store: SourceZoneIndexes | None = None

    def _opened(self) -> SourceZoneIndexes:
        if self._store is None:
            from pcbo_dagster.catalog.store import CatalogStore

            store = CatalogStore(self.url)
            store.migrate()
            self._store = store
        return self._store

    def zone_index(self, key: str) -> bytes | None:
        return self._opened().zone_index(key)

    def save_zone_index(self, key: str, data: bytes) -> None:
        self._opened().save_zone_index(key, data)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
