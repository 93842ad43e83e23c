"""The zone indexes of streamed sources (`sources/zones.py`), kept in the catalog for every host.

A cache, keyed by the source's identity: rows are only inserted (a second writer of the same key
changes nothing) and may be deleted at any time.

**Authenticated.** An index decides which parts of a source a run never reads, so a forged row
(someone who can write the catalog) would change what a run writes while its chain, recording the
forged decisions, still verifies. `LazyZoneIndexes` therefore stores each index with an HMAC-SHA256
over its key and bytes, under a secret the catalog does not hold (`source_index_secret`:
`PCBO_SOURCE_INDEX_KEY`, which hosts sharing a catalog share to share their indexes, else a random
key made once in `$PCBO_HOME/.keys/source-index.key`, mode 0600), and takes a row only when its MAC
verifies: any other row is dropped and the source read whole, as without an index.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy import delete, select

from pcbo_dagster.catalog import schema as t
from pcbo_dagster.catalog.database import Database, insert_ignore
from pcbo_dagster.io.clock import utc_now
from pcbo_dagster.io.host_keys import host_secret


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

    def drop_zone_index(self, key: str) -> None:
        with self.write() as conn:
            conn.execute(delete(t.source_zone_indexes).where(t.source_zone_indexes.c.index_key == key))


KEY_ENV = "PCBO_SOURCE_INDEX_KEY"
#: Under the home, hidden: a server never reads a hidden path of its sources directory as a source.
KEY_FILE = ".keys/source-index.key"


def source_index_secret(home: Path, environ: Mapping[str, str] | None = None) -> bytes:
    """The secret zone index rows are authenticated with (module doc): the SHA-256 of
    `PCBO_SOURCE_INDEX_KEY`, else 32 random bytes kept in `home/.keys/source-index.key` (made on first use,
    mode 0600; never logged). The mechanism is `io.host_keys.host_secret`'s."""
    return host_secret(home, KEY_ENV, KEY_FILE, environ)


def _mac(secret: bytes, key: str, data: bytes) -> str:
    return hmac.new(secret, key.encode("utf-8") + b"\0" + data, hashlib.sha256).hexdigest()


class LazyZoneIndexes:
    """The catalog's zone indexes, authenticated with `secret` (module doc), the catalog opened (and
    migrated) only when first asked: a run whose sources need no index never touches the catalog
    here."""

    def __init__(self, url: str, secret: bytes) -> None:
        self.url = url
        self.secret = secret
        self._store: SourceZoneIndexes | None = None

    def _opened(self) -> SourceZoneIndexes:
        if self._store is None:
            from pcbo_dagster.catalog.store import CatalogStore

            store = CatalogStore(self.url)
            store.migrate()
            self._store = store
        return self._store

    def zone_index(self, key: str) -> bytes | None:
        """The index stored under `key` when its MAC verifies; None otherwise (a row that does not
        verify is dropped, so the index built next takes its place)."""
        stored = self._opened().zone_index(key)
        if stored is None:
            return None
        mac, _, data = stored.partition(b":")
        if hmac.compare_digest(mac, _mac(self.secret, key, data).encode("ascii")):
            return data
        self._opened().drop_zone_index(key)
        return None

    def save_zone_index(self, key: str, data: bytes) -> None:
        self._opened().save_zone_index(key, _mac(self.secret, key, data).encode("ascii") + b":" + data)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
