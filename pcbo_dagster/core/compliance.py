"""Policy compliance of rows already written: the post-write check, `verify` and the Dagster checks.

Works on a table read back from the lake (the parquet schema of `record_table`), column-wise.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pcbo_dagster.core.decisions import (
    ALREADY_PRESENT,
    CONSENT_MISSING,
    JURISDICTION_NOT_ALLOWED,
    RETENTION_EXPIRED,
)
from pcbo_dagster.core.plan import NormalizedPolicies, normalize_jurisdictions
from pcbo_dagster.core.record_table import ID, RETENTION_EXPIRES_AT


def _column(table: pa.Table, name: str) -> pa.Array:
    if name in table.column_names:
        return table[name].combine_chunks()
    return pa.nulls(table.num_rows)


def violations(
    table: pa.Table, policies: NormalizedPolicies, existing_ids: list[str]
) -> list[dict[str, Any]]:
    """Rows that the policy would not have added: `[{id, reasons}]`, sorted by id."""
    n = table.num_rows
    if n == 0:
        return []
    checks: list[tuple[str, pa.Array]] = []
    if policies.require_consent:
        consent = _column(table, "consentGranted")
        ok = pc.equal(consent, True) if pa.types.is_boolean(consent.type) else pa.nulls(n, pa.bool_())
        checks.append((CONSENT_MISSING, pc.invert(pc.fill_null(ok, False))))
    if policies.allowed_jurisdictions is not None:
        jurisdiction = _column(table, "jurisdiction")
        if pa.types.is_string(jurisdiction.type):
            allowed = pa.array(list(policies.allowed_jurisdictions), pa.string())
            ok = pc.is_in(normalize_jurisdictions(jurisdiction), value_set=allowed)
        else:
            ok = pa.nulls(n, pa.bool_())
        checks.append((JURISDICTION_NOT_ALLOWED, pc.invert(pc.fill_null(ok, False))))
    if policies.retention_cutoff_us is not None:
        retention = _column(table, RETENTION_EXPIRES_AT)
        if pa.types.is_timestamp(retention.type):
            micros = pc.cast(pc.cast(retention, pa.timestamp("us", tz="UTC")), pa.int64())
            ok = pc.greater(micros, pa.scalar(policies.retention_cutoff_us, pa.int64()))
        else:
            ok = pa.nulls(n, pa.bool_())
        checks.append((RETENTION_EXPIRED, pc.invert(pc.fill_null(ok, False))))
    if existing_ids:
        present = pc.is_in(_column(table, ID), value_set=pa.array(existing_ids, pa.string()))
        checks.append((ALREADY_PRESENT, pc.fill_null(present, False)))
    if not checks:
        return []
    any_bad = checks[0][1]
    for _, bad in checks[1:]:
        any_bad = pc.or_(any_bad, bad)
    rows = [i for i, bad in enumerate(any_bad.to_pylist()) if bad]
    if not rows:
        return []
    ids = _column(table, ID).to_pylist()
    flags = {reason: bad.to_pylist() for reason, bad in checks}
    found = [{"id": ids[i], "reasons": [r for r, _ in checks if flags[r][i]]} for i in rows]
    return sorted(found, key=lambda v: (v["id"] or "", v["reasons"]))
