"""The threat model's catalog writer in tests: someone who can write pcbo's catalog database (and
nothing else) runs SQL statements against it directly."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.engine.settings import Settings


def write_catalog(base: Settings, *statements: tuple[str, dict[str, Any]]) -> None:
    """Run `statements` (SQL text, parameters) in one transaction on the catalog of `base`."""
    catalog = CatalogStore(base.catalog_url)
    try:
        with catalog.engine.begin() as conn:
            for statement, params in statements:
                conn.execute(sa.text(statement), params)
    finally:
        catalog.close()
