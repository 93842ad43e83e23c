"""The smallest pyarrow + hashlib pipeline that does the essential work of `pcbo execute`.

`python benchmarks/minimal_pipeline.py --input req.json --out-dir DIR`

It is the floor `engine_benchmark.py` compares the engine against: load the JSON request, build Arrow
columns, apply the consent / jurisdiction / retention / existing-id rules and the time window with
pyarrow.compute, assign partitions, and per partition sort the added rows by id, write one zstd
parquet file, SHA-256 its bytes and compute the RFC 6962 Merkle root of the sorted ids.

Deliberately absent (these are product features, not essential work): request validation, real
duplicate-id handling (it only drops every id that occurs more than once, two vectorised calls, so its
added-row count matches the engine's), invalid-record details, per-record canonical hashes,
plan/decision hashes, manifests, the audit chain, the catalog, reconciliation. It assumes every
timestamp in the request is valid. Prints a small JSON summary (files, rows, bytes) on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TS = pa.timestamp("us", tz="UTC")
KNOWN = ("id", "occurredAt", "retentionExpiresAt")


def instant_us(text: str) -> int:
    """Microseconds since the epoch of an ISO-8601 instant with an offset."""
    dt = datetime.fromisoformat(text).astimezone(UTC)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def merkle_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash, level by level (an odd last node moves up unchanged)."""
    sha = hashlib.sha256
    if not leaves:
        return sha(b"").digest()
    level = [sha(b"\x00" + leaf).digest() for leaf in leaves]
    while len(level) > 1:
        nxt = [sha(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def extra_column(values: list) -> pa.Array:
    """Let Arrow infer the type; values it cannot type (mixed kinds) are stored as JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v, sort_keys=True) for v in values], pa.string())


def run(request_path: str, out_dir: str) -> dict:
    with open(request_path, encoding="utf-8") as fh:
        req = json.load(fh)
    recs = req["sourceRecords"]
    policies = req.get("policies") or {}

    # Arrow columns for the known fields.
    ids = pa.array([r.get("id") for r in recs], pa.string())
    occ = pa.array([r.get("occurredAt") for r in recs], pa.string()).cast(TS)
    ret = pa.array([r.get("retentionExpiresAt") for r in recs], pa.string()).cast(TS)
    consent = pa.array([r.get("consentGranted") is True for r in recs], pa.bool_())
    jur = pa.array(
        [j if isinstance(j, str) else None for j in (r.get("jurisdiction") for r in recs)], pa.string()
    )

    # Time window and the policy rules.
    start_us = instant_us(req["start"])
    end_us = instant_us(req["end"])
    chunk_us = int(req.get("chunkSeconds", 3600)) * 1_000_000
    occ_us = occ.cast(pa.int64())
    keep = pc.and_(pc.greater_equal(occ_us, start_us), pc.less(occ_us, end_us))
    if policies.get("requireConsent", True):
        keep = pc.and_(keep, consent)
    allowed = policies.get("allowedJurisdictions")
    if allowed is not None:
        allowed_set = pa.array(sorted({a.strip().upper() for a in allowed}), pa.string())
        norm = pc.utf8_upper(pc.utf8_trim_whitespace(jur))
        keep = pc.and_(keep, pc.is_in(norm, value_set=allowed_set))
    cutoff = policies.get("retentionCutoff")
    if cutoff is not None:
        keep = pc.and_(keep, pc.greater(ret.cast(pa.int64()), instant_us(cutoff)))
    existing = pa.array(req.get("existingTargetIds") or [], pa.string())
    keep = pc.and_(keep, pc.invert(pc.is_in(ids, value_set=existing)))
    # Not the engine's duplicate handling (no canonical-form comparison, identical copies are not
    # kept): just drop every id that occurs more than once, so the added-row count matches the engine's.
    counts = pc.value_counts(ids)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    keep = pc.and_(keep, pc.invert(pc.is_in(ids, value_set=repeated)))
    keep = pc.fill_null(pc.and_(keep, pc.is_valid(ids)), False)

    # The added rows as one table, with their partition index.
    sel = pc.indices_nonzero(keep)
    sel_np = sel.to_numpy()
    added = [recs[i] for i in sel_np]
    extra_names = sorted({k for r in added for k in r}.difference(KNOWN))
    arrays = [ids.take(sel), occ.take(sel), ret.take(sel)]
    arrays += [extra_column([r.get(name) for r in added]) for name in extra_names]
    table = pa.Table.from_arrays(arrays, names=[*KNOWN, *extra_names])
    part = pc.divide(pc.subtract(occ_us.take(sel), start_us), chunk_us)
    order = pc.sort_indices(part)
    table = table.take(order)
    part_sorted = part.take(order).to_numpy()
    n_parts = -(-(end_us - start_us) // chunk_us)
    bounds = np.searchsorted(part_sorted, np.arange(n_parts + 1))

    # Per partition: sort by id, write zstd parquet, hash the file, Merkle root of the ids.
    files = rows = total_bytes = 0
    checksums, roots = [], []
    for p in range(n_parts):
        chunk = table.slice(bounds[p], bounds[p + 1] - bounds[p]).sort_by("id")
        path = os.path.join(out_dir, f"part-{p:06d}.parquet")
        pq.write_table(chunk, path, compression="zstd")
        with open(path, "rb") as fh:
            data = fh.read()
        checksums.append(hashlib.sha256(data).hexdigest())
        roots.append(merkle_root([s.encode("utf-8") for s in chunk.column("id").to_pylist()]).hex())
        files += 1
        rows += chunk.num_rows
        total_bytes += len(data)
    return {"files": files, "rows": rows, "bytes": total_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="the request JSON file")
    parser.add_argument("--out-dir", required=True, help="directory for the parquet files")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    json.dump(run(args.input, args.out_dir), sys.stdout)
    print()


if __name__ == "__main__":
    main()
