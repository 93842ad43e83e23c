"""Deterministic synthetic backfill requests for benchmarks and demos.

`python benchmarks/generate_request.py --records 200000 --partitions 720 --out req.json`
Roughly 60% of the records are added; the rest are omitted for each policy reason, duplicated,
already present, or unplaced. A fixed seed makes the same file every time.
"""

from __future__ import annotations

import argparse
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any


def make_request(
    records: int = 200_000, partitions: int = 720, seed: int = 7, run_id: str = "bench-run-001"
) -> dict:
    rng = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    span_s = partitions * 3600
    recs = []
    for i in range(records):
        at = start + timedelta(seconds=rng.randrange(span_s), microseconds=rng.choice((0, 0, 0, 250_000)))
        roll = rng.random()
        rec: dict[str, Any] = {
            "id": f"rec-{i:08d}",
            "occurredAt": at.strftime("%Y-%m-%dT%H:%M:%S")
            + (f".{at.microsecond:06d}" if at.microsecond else "")
            + "Z",
            "jurisdiction": rng.choice(("US", "CA", " us", "ca ")),
            "consentGranted": True,
            "retentionExpiresAt": "2026-01-01T00:00:00Z",
            "amount": rng.randrange(1, 10_000),
            "channel": rng.choice(("web", "store", "app")),
            "converted": rng.random() < 0.9,
        }
        if roll < 0.10:
            rec["consentGranted"] = rng.choice((False, None, "true"))
        elif roll < 0.20:
            rec["jurisdiction"] = rng.choice(("FR", "DE", None))
        elif roll < 0.30:
            rec["retentionExpiresAt"] = rng.choice(("2023-06-01T00:00:00Z", None))
        elif roll < 0.33:
            rec["id"] = f"legacy-{i % 5000:05d}"
        elif roll < 0.36 and i > 0:
            rec["id"] = f"rec-{i - 1:08d}"
        elif roll < 0.38:
            rec["occurredAt"] = "2023-12-31T23:59:59Z"
        recs.append(rec)
    return {
        "runId": run_id,
        "dataset": "events",
        "versionLabel": "v1",
        "start": "2024-01-01T00:00:00Z",
        "end": (start + timedelta(seconds=span_s)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "chunkSeconds": 3600,
        "policies": {
            "requireConsent": True,
            "allowedJurisdictions": ["US", "CA"],
            "retentionCutoff": "2024-06-01T00:00:00Z",
            "onViolation": "omit",
        },
        "sourceRecords": recs,
        "existingTargetIds": [f"legacy-{i:05d}" for i in range(0, 5000, 2)],
        "expectedDecisionHash": None,
        "metadata": {"initiator": "benchmark"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=720)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(make_request(args.records, args.partitions, args.seed), fh)


if __name__ == "__main__":
    main()
