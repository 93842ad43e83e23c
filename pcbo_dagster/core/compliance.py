"""Policy compliance of rows already written: the post-write check, `verify` and the Dagster checks.

Works on a table read back from the lake (the parquet schema of `record_table`), column-wise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
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


def violation_flags(
    table: pa.Table, policies: NormalizedPolicies, existing_ids: list[str] | pa.Array
) -> list[tuple[str, np.ndarray]]:
    """Per reason (in their fixed order), a boolean per row: the rule the policy would have omitted
    the row for. Only the reasons the policy checks are listed; one set of vectorised calls for the
    whole table (a commit batch's rows at once)."""
    n = table.num_rows
    checks: list[tuple[str, pa.Array]] = []
    if n == 0:
        return []
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
    if len(existing_ids):
        if not isinstance(existing_ids, pa.Array):
            existing_ids = pa.array(existing_ids, pa.string())
        present = pc.is_in(_column(table, ID), value_set=existing_ids)
        checks.append((ALREADY_PRESENT, pc.fill_null(present, False)))
    return [(reason, bad.to_numpy(zero_copy_only=False)) for reason, bad in checks]


def listed_violations(
    ids: list[Any], flags: list[tuple[str, np.ndarray]], lo: int, hi: int
) -> list[dict[str, Any]]:
    """The rows `lo`..`hi` of `violation_flags` that break a rule: `[{id, reasons}]`, sorted by id
    (`ids`: the id column of rows `lo`..`hi`)."""
    if not flags:
        return []
    any_bad = np.zeros(hi - lo, dtype=bool)
    for _, bad in flags:
        any_bad |= bad[lo:hi]
    rows = np.flatnonzero(any_bad).tolist()
    if not rows:
        return []
    found = [{"id": ids[i], "reasons": [r for r, bad in flags if bad[lo + i]]} for i in rows]
    return sorted(found, key=lambda v: (v["id"] or "", v["reasons"]))


def violations(
    table: pa.Table, policies: NormalizedPolicies, existing_ids: list[str]
) -> list[dict[str, Any]]:
    """Rows that the policy would not have added: `[{id, reasons}]`, sorted by id."""
    flags = violation_flags(table, policies, existing_ids)
    if not flags:
        return []
    any_bad = np.zeros(table.num_rows, dtype=bool)
    for _, bad in flags:
        any_bad |= bad
    if not any_bad.any():
        return []
    return listed_violations(_column(table, ID).to_pylist(), flags, 0, table.num_rows)
