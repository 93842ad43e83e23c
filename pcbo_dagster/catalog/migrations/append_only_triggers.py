"""The triggers that keep a catalog table append-only, as the migrations create and drop them.

SQLite: `<table>_no_update` and `<table>_no_delete` refuse UPDATE and DELETE, and `<table>_no_replace`
refuses an INSERT that would replace a row (`INSERT OR REPLACE`, `REPLACE`: SQLite deletes the old
row without firing DELETE triggers) when the table's conflict condition is given. PostgreSQL:
`<table>_append_only` (UPDATE, DELETE) and `<table>_no_truncate` call `pcbo_refuse_mutation()`, the
function revision 0001 creates. `schema.append_only_triggers` lists what `pcbo verify`
looks for."""

from __future__ import annotations

from alembic import op


def create_append_only_triggers(table: str, replace_conflict: str | None = None) -> None:
    """Make `table` append-only on the migration's dialect; `replace_conflict` (SQLite) is the
    condition on `NEW` under which an INSERT would replace an existing row."""
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {action} refused'); END"
            )
        if replace_conflict is not None:
            op.execute(
                f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "
                f"WHEN EXISTS (SELECT 1 FROM {table} WHERE {replace_conflict}) "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: REPLACE refused'); END"
            )
    elif dialect == "postgresql":
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION pcbo_refuse_mutation()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION pcbo_refuse_mutation()"
        )
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise NotImplementedError(f"append-only triggers not written for dialect {dialect!r}")


def drop_append_only_triggers(table: str) -> None:
    """Drop what `create_append_only_triggers` created for `table` (whichever of them exist)."""
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for action in ("update", "delete", "replace"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{action}")
    elif dialect == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
