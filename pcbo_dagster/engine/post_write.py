"""The post-write check: a commit batch's committed files read back from the lake and checked against
their manifests, the decisions and the policy (the `reconciliation` of an execute).

For each partition: every data file's bytes against the manifest's checksum; then, for a partition
this run committed (`full`), its rows decoded: row count against the manifest, ids (in order) against
the decided adds, the Merkle root over the written ids against the manifest's, and every row against
the policy. For a partition left unchanged (`full=False`, checked when it was committed) the file
bytes are checked against the manifest's checksum and the decided adds against the manifest's Merkle
root, without decoding the rows again (the root of the decided adds is computed here unless the caller
gives it, computed from those same ids: `expected_root`); with `read=False` too, the file bytes were
already checked (or restored) while staging and are not read again.

The files are read, checksummed and decoded one partition at a time (on the pool's threads when there
is one); the rows of the whole batch are then checked in one set of vectorised calls: one comparison
of the written ids with the decided ones, one evaluation of each policy rule. Where a partition's
written ids equal its decided adds exactly, the Merkle root over them is the manifest's by
construction (`execute` built the manifest's root from those same ids), so it is not recomputed; it
is recomputed from the written ids wherever they differ, for the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pcbo_dagster.core import merkle
from pcbo_dagster.core.canonical import prefixed, sha256_hex
from pcbo_dagster.core.compliance import listed_violations, violation_flags
from pcbo_dagster.core.plan import Plan
from pcbo_dagster.core.record_table import ID, RETENTION_EXPIRES_AT
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.lake import parquet_files
from pcbo_dagster.lake.manifests import Manifest

#: The columns the post-write check reads back (the rest of a row plays no part in the policy).
CHECKED_COLUMNS = (ID, "consentGranted", "jurisdiction", RETENTION_EXPIRES_AT)


@dataclass(frozen=True)
class CheckItem:
    """One partition to check: its manifest (for `full`, one this run built from `expected_ids`), the
    decided adds in output order, and how much to check (see the module's docstring)."""

    manifest: Manifest
    expected_ids: list[str]
    full: bool = True
    read: bool = True
    #: The RFC 6962 root of exactly `expected_ids`, when the caller has computed it (staging does, for
    #: the manifest it compares): not computed again. None: computed here.
    expected_root: str | None = None


@dataclass
class _Read:
    """A partition's files as read back: findings so far, rows counted, decoded tables (full only)."""

    findings: list[str] = field(default_factory=list)
    rows: int = 0
    unreadable: bool = False
    tables: list[pa.Table] = field(default_factory=list)


def _read_back(env: Environment, item: CheckItem) -> _Read:
    """Read (and for `full` decode) a partition's files; safe on a worker thread."""
    got = _Read()
    for entry in item.manifest["files"]:
        if not item.full and not item.read:
            got.rows += entry["rowCount"]
            continue
        data = env.lake.read(entry["path"])
        if prefixed(sha256_hex(data)) != entry["checksum"]:
            got.findings.append(f"{entry['path']}: unreadable: its checksum differs from the manifest")
            got.unreadable = True
            continue
        if not item.full:
            got.rows += entry["rowCount"]
            continue
        table = parquet_files.decode(data, columns=CHECKED_COLUMNS)
        got.rows += table.num_rows
        if table.num_rows != entry["rowCount"]:
            got.findings.append(f"{entry['path']}: {table.num_rows} rows, manifest says {entry['rowCount']}")
        got.tables.append(table)
    return got


def _in_order(pool: ThreadPoolExecutor | None, fn: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
    if pool is None or len(items) < 2:
        return map(fn, items)
    return pool.map(fn, items)


def _batch_table(tables: list[pa.Table]) -> pa.Table | None:
    """The batch's decoded tables as one (None when their schemas differ: each is checked alone)."""
    if not tables:
        return None
    schema = tables[0].schema
    if any(not t.schema.equals(schema) for t in tables[1:]):
        return None
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def check_batch(
    env: Environment,
    plan: Plan,
    items: Iterable[CheckItem],
    existing_ids: list[str],
    pool: ThreadPoolExecutor | None = None,
) -> list[dict[str, Any]]:
    """The post-write check of each item, in the items' order (the `reconciliation` entries)."""
    items = list(items)
    reads: list[_Read] = list(_in_order(pool, lambda item: _read_back(env, item), items))
    existing = pa.array(existing_ids, pa.string())

    # Every decoded file of the batch, in order: one table, one id column, one set of policy flags.
    tables = [t for got in reads for t in got.tables]
    whole = _batch_table(tables)
    segments: list[tuple[pa.Table, int]] = []  # (table the file's rows are in, first row there)
    if whole is not None:
        at = 0
        for t in tables:
            segments.append((whole, at))
            at += t.num_rows
        flags_of = {id(whole): violation_flags(whole, plan.policies, existing)}
    else:
        segments = [(t, 0) for t in tables]
        flags_of = {id(t): violation_flags(t, plan.policies, existing) for t in tables}

    # Written ids against decided ids: equal for the whole batch at once, else partition by partition.
    full_items = [(item, got) for item, got in zip(items, reads, strict=True) if item.full]
    batch_ids_equal = False
    if whole is not None and all(
        got.rows == len(item.expected_ids) and not got.unreadable for item, got in full_items
    ):
        expected = pa.array([i for item, _ in full_items for i in item.expected_ids], pa.string())
        batch_ids_equal = whole[ID].combine_chunks().equals(expected)

    results = []
    file_at = 0
    for item, got in zip(items, reads, strict=True):
        findings = list(got.findings)
        manifest, expected_ids = item.manifest, item.expected_ids
        violating: list[dict[str, Any]] = []
        for table in got.tables:
            source, lo = segments[file_at]
            file_at += 1
            hi = lo + table.num_rows
            flags = flags_of[id(source)]
            if any(bad[lo:hi].any() for _, bad in flags):
                violating.extend(listed_violations(table[ID].to_pylist(), flags, lo, hi))
        if item.full:
            if batch_ids_equal:
                ids_match = True
                root = manifest["merkleRoot"]  # the root of exactly these ids (see the module docstring)
            else:
                ids = [i for t in got.tables for i in t[ID].to_pylist()]
                ids_match = ids == expected_ids
                root = manifest["merkleRoot"] if ids_match else merkle.root_hex(ids)
        else:
            root = manifest["merkleRoot"]
            expected_root = item.expected_root
            if expected_root is None:
                expected_root = merkle.root_hex(expected_ids)
            ids_match = got.rows == len(expected_ids) and expected_root == root
        # Rows of an unreadable file were not read: counting the others would only repeat that finding.
        if not ids_match and not got.unreadable:
            findings.append(f"rows written ({got.rows}) differ from the decided adds ({len(expected_ids)})")
        if root != manifest["merkleRoot"] and not got.unreadable:
            findings.append("the Merkle root recomputed from the written file differs from the manifest")
        if violating:
            findings.append(f"{len(violating)} written row(s) violate the policy")
        results.append(
            {
                "key": manifest["partition"]["key"],
                "decidedAdds": len(expected_ids),
                "rowsWritten": got.rows,
                "idsMatch": ids_match,
                "merkleRoot": manifest["merkleRoot"],
                "rootRecomputed": root,
                "rootMatches": root == manifest["merkleRoot"],
                "policyViolations": violating[:20],
                "policyViolationCount": len(violating),
                "checked": "rows" if item.full else "checksum",
                "status": "ok" if not findings else "failed",
                "findings": findings,
            }
        )
    return results
