"""`pcbo query --dataset D "SQL"`: SQL over a dataset version's Iceberg table, with DuckDB.

The table is the one the dataset version's audit chain declares it publishes to (its
`table_publication_recorded` event, the chain verified first; the catalog's `table_publications` row is
a listing, not read here), at its branch's
current snapshot, as a DuckDB view named like the Iceberg table (`ns.table`), so the SQL a user writes
here runs as it is in any DuckDB that reads the table. Two readers, the same rows:

- `duckdb-iceberg` (the default when installed: `pip install '.[iceberg]'`): DuckDB's own Iceberg
  reader, `iceberg_scan(<metadata.json>, snapshot_from_id => N)`, its `iceberg` and `avro` extensions
  loaded from the PyPI packages `duckdb-extension-iceberg` / `duckdb-extension-avro` (DuckDB checks
  their signatures; nothing is downloaded, so it works offline). Local lakes only.
- `pyiceberg`: pyiceberg plans the scan and reads the files into Arrow, which DuckDB queries (any lake
  pyiceberg can read; used when the extension packages are absent or the lake is remote).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import glob
import os
from typing import TYPE_CHECKING, Any

from pcbo_dagster.core.errors import InvalidInput, PcboError
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.tables.iceberg_publication import (
    MAIN_BRANCH,
    confined_manifests,
    declared_publications,
    load_table,
    read_table_metadata,
    recorded_target,
    table_metadata_confinement,
)

if TYPE_CHECKING:
    from pcbo_dagster.engine.environment import Environment

READERS = ("auto", "duckdb-iceberg", "pyiceberg")


def duckdb_iceberg_extensions() -> list[str] | None:
    """Paths of the `avro` and `iceberg` extension binaries shipped as PyPI packages for the installed
    DuckDB, or None when they are not installed."""
    try:
        import duckdb
        import duckdb_extension_avro
        import duckdb_extension_iceberg
    except ImportError:
        return None
    paths = []
    for module in (duckdb_extension_avro, duckdb_extension_iceberg):
        found = glob.glob(
            os.path.join(module.__path__[0], "extensions", f"v{duckdb.__version__}", "*.duckdb_extension")
        )
        if not found:
            return None
        paths.append(found[0])
    return paths


def connect_duckdb() -> Any:
    """A DuckDB connection; `PcboError` naming the extra when DuckDB is not installed."""
    try:
        import duckdb
    except ImportError:
        raise PcboError("pcbo query needs DuckDB: pip install -c constraints.txt '.[iceberg]'") from None
    return duckdb.connect()


def query(
    env: Environment,
    dataset: str,
    version_label: str,
    sql: str,
    *,
    branch: str = MAIN_BRANCH,
    reader: str = "auto",
) -> dict[str, Any]:
    """Run `sql` over the dataset version's table (see the module doc)."""
    if reader not in READERS:
        raise InvalidInput("reader", f"must be one of {', '.join(READERS)}")
    if not sql.strip():
        raise InvalidInput("SQL", "is empty: give the query to run")
    # The table the dataset version's chain declares (read and verified as a reader holding no lock
    # reads it), never the catalog's row of it: the catalog is writable by whoever forges history, and
    # a row naming another catalog URL had the query create a SQLite catalog wherever it pointed.
    from pcbo_dagster.engine.partition_checks import verified_chain

    events = verified_chain(
        env, dataset, version_label, f"pcbo query of {dataset}/{version_label}", sync=False
    )
    recorded = declared_publications(events.events, env.operator_verifier)
    if not recorded:
        raise InvalidInput(
            "dataset", f"{dataset}/{version_label} publishes no table (give its request or config a table)"
        )
    # The branch's own record, else the table's (a rollout's `staging` branch is recorded by staging).
    target = recorded_target(recorded.get(branch) or recorded[min(recorded)], env)
    from pyiceberg.exceptions import NoSuchTableError

    try:
        table = load_table(env, target)
    except NoSuchTableError:
        raise PcboError(
            f"table {target.name} does not exist yet (a crash before its first publication, or dropped): "
            "pcbo verify --repair creates and publishes it"
        ) from None
    snapshot = table.metadata.snapshot_by_name(branch)
    if snapshot is None:
        raise InvalidInput("branch", f"table {target.name} has no branch {branch!r}")
    # (Neither reader is handed a manifest list or manifest outside the table's metadata directory.)
    confine = table_metadata_confinement(env, target)
    read_table_metadata(lambda: confined_manifests(table, snapshot, confine))
    connection = connect_duckdb()
    namespace, name = target.name.split(".")
    extensions = duckdb_iceberg_extensions()
    local = table.metadata_location.startswith("file://")
    if reader == "duckdb-iceberg" and (extensions is None or not local):
        raise InvalidInput(
            "reader",
            "duckdb-iceberg needs the duckdb-extension-iceberg and -avro packages and a local lake",
        )
    use_extension = reader == "duckdb-iceberg" or (reader == "auto" and extensions is not None and local)
    connection.execute(f'CREATE SCHEMA "{namespace}"')
    if use_extension:
        assert extensions is not None
        for path in extensions:
            connection.load_extension(path)
        location = table.metadata_location.replace("'", "''")
        connection.execute(
            f'CREATE VIEW "{namespace}"."{name}" AS SELECT * FROM '
            f"iceberg_scan('{location}', snapshot_from_id => {snapshot.snapshot_id})"
        )
    else:
        arrow = table.scan(snapshot_id=snapshot.snapshot_id).to_arrow()
        connection.register("pcbo_scanned_table", arrow)
        connection.execute(f'CREATE VIEW "{namespace}"."{name}" AS SELECT * FROM pcbo_scanned_table')
    try:
        result = connection.execute(sql)
    except Exception as exc:  # DuckDB's parser, binder and catalog errors are all the query's fault
        if type(exc).__module__.split(".")[0] != "duckdb" and not type(exc).__module__.startswith("_duckdb"):
            raise
        raise InvalidInput("SQL", str(exc).splitlines()[0]) from None
    if result is None:  # DuckDB's answer to text that holds no statement (a comment, a lone ';')
        raise InvalidInput("SQL", "holds no statement: give the query to run")
    columns = [d[0] for d in result.description or []]
    rows = [[_json_value(v) for v in row] for row in result.fetchall()]
    return {
        "dataset": dataset,
        "versionLabel": version_label,
        "table": {**target.describe(), "branch": branch},
        "snapshotId": snapshot.snapshot_id,
        "metadataLocation": redact_url(table.metadata_location),
        "reader": "duckdb-iceberg" if use_extension else "pyiceberg",
        "sql": sql,
        "columns": columns,
        "rows": rows,
        "rowCount": len(rows),
    }


def _json_value(value: Any) -> Any:
    """A DuckDB result value as JSON: instants as `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, decimals and
    huge integers beyond 2**53 as strings, bytes as base64."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
            text = value.isoformat()
            return (text[:-7] if text.endswith(".000000") else text) + "Z"
        return value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53 - 1:
        return str(value)
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return value
