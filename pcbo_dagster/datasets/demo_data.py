"""Deterministic demo sources for `examples/datasets.yaml`, so `dagster dev` works on a fresh clone.

`generate_demo_data(directory)` writes:

- `events.jsonl`: three days of events (2024-01-01 to 2024-01-04 UTC), about 50 an hour, with
  consent, jurisdiction and retention violations, jurisdictions that need trimming/upper-casing,
  ids also listed in the example's `existingTargetIds`, exact and conflicting duplicates, and a
  few invalid records (they end up `unplaced`).
- `sessions.jsonl`: one day of checkout sessions (2024-01-01 UTC), about ten an hour, about 90%
  of them `converted` (the staged-rollout example's business metric holds it at 85% or more), with a
  few consent and jurisdiction omissions.
- `ledgers.jsonl`: one record per ledger for ledgers 2-641 (five seconds apart from
  2024-01-01T00:00:00Z), each with its `ledgerSequence`, for the ledger-range example dataset.

Every value comes from SHA-256 of a fixed seed and the record's position (no `random`, no wall
clock), and the files are written with sorted keys: the bytes are the same on every machine and
Python version. `python -m pcbo_dagster.datasets.demo_data DIRECTORY` does the same as `pcbo demo-data`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from pcbo_dagster.core.instants import format_instant, parse_instant
from pcbo_dagster.core.json_documents import compact_text
from pcbo_dagster.io.atomic_files import replace_file

SEED = "pcbo-demo-data/1"
EVENTS_FILE = "events.jsonl"
LEDGERS_FILE = "ledgers.jsonl"
SESSIONS_FILE = "sessions.jsonl"
SESSIONS_HOURS = 24
SESSIONS_PER_HOUR = 10
EVENTS_START = "2024-01-01T00:00:00Z"
EVENTS_HOURS = 72
EVENTS_PER_HOUR = 50
FIRST_LEDGER = 2
LAST_LEDGER = 641
LEDGER_SECONDS = 5

_US_PER_S = 1_000_000
# Two in sixteen are outside the example's allowed US/CA; three need trimming or upper-casing.
_JURISDICTIONS = ["US"] * 7 + ["CA"] * 4 + [" us", "ca ", "Us", "DE", "BR"]
_CHANNELS = ["web", "app", "store", "partner"]


def _draw(*parts: object) -> int:
    """A deterministic 64-bit number from the seed and `parts`."""
    text = "\x1f".join([SEED, *map(str, parts)]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big")


def _pick(options: list[Any], *parts: object) -> Any:
    return options[_draw(*parts) % len(options)]


def _percent(*parts: object) -> int:
    return _draw(*parts) % 100


def _start_us() -> int:
    start_us = parse_instant(EVENTS_START)
    assert start_us is not None
    return start_us


def _event(number: int, hour: int, start_us: int) -> dict[str, Any]:
    offset_ms = _draw("offset", number) % 3_600_000
    occurred = start_us + hour * 3600 * _US_PER_S + offset_ms * 1000
    record: dict[str, Any] = {
        "id": f"evt-{number:06d}",
        "occurredAt": format_instant(occurred),
        "jurisdiction": _pick(_JURISDICTIONS, "jurisdiction", number),
        "consentGranted": True,
        "retentionExpiresAt": "2026-01-01T00:00:00Z",
        "amount": _draw("amount", number) % 10_000,
        "channel": _pick(_CHANNELS, "channel", number),
        "converted": _percent("converted", number) < 30,
    }
    consent = _percent("consent", number)
    if consent < 3:
        record["consentGranted"] = False
    elif consent < 5:
        record["consentGranted"] = "true"  # a string is not consent
    elif consent < 6:
        del record["consentGranted"]
    retention = _percent("retention", number)
    if retention < 3:
        record["retentionExpiresAt"] = "2024-03-01T00:00:00Z"  # before the example's cutoff
    elif retention < 4:
        record["retentionExpiresAt"] = None  # unknown retention fails closed
    if _percent("nested", number) < 10:
        record["attributes"] = {"campaign": f"c-{_draw('campaign', number) % 7}", "tags": ["demo"]}
    return record


def demo_events() -> list[dict[str, Any]]:
    """The records of `events.jsonl`, in file order."""
    records: list[dict[str, Any]] = []
    number = 0
    start_us = _start_us()
    for hour in range(EVENTS_HOURS):
        for _ in range(EVENTS_PER_HOUR - 5 + _draw("per-hour", hour) % 11):
            records.append(_event(number, hour, start_us))
            number += 1
    # Exact duplicates (one copy is kept) and conflicting duplicates (every copy is omitted).
    for index in range(0, len(records), 397):
        records.append(dict(records[index]))
    for index in range(211, len(records), 541):
        changed = dict(records[index])
        changed["amount"] = changed["amount"] + 1
        records.append(changed)
    # Invalid records: they belong to no partition (INVALID_RECORD).
    records.append({"id": "evt-invalid-1", "occurredAt": "2024-01-01T10:00:00", "jurisdiction": "US"})
    records.append({"id": "", "occurredAt": "2024-01-02T10:00:00Z"})
    records.append(
        {"id": "evt-invalid-3", "occurredAt": "2024-01-02T10:00:00Z", "retentionExpiresAt": "soon"}
    )
    # Input order never matters to the engine: shuffle deterministically anyway.
    order = sorted(range(len(records)), key=lambda i: _draw("order", i))
    return [records[i] for i in order]


def demo_ledgers() -> list[dict[str, Any]]:
    """The records of `ledgers.jsonl`: one per ledger, in ledger order."""
    start_us = _start_us()
    records = []
    for sequence in range(FIRST_LEDGER, LAST_LEDGER + 1):
        records.append(
            {
                "id": f"ledger-{sequence:010d}",
                "ledgerSequence": sequence,
                "occurredAt": format_instant(
                    start_us + (sequence - FIRST_LEDGER) * LEDGER_SECONDS * _US_PER_S
                ),
                "jurisdiction": "US",
                "consentGranted": _percent("ledger-consent", sequence) >= 2,
                "retentionExpiresAt": "2030-01-01T00:00:00Z",
                "transactionCount": _draw("ledger-tx", sequence) % 300,
                "closedBy": f"validator-{_draw('ledger-validator', sequence) % 5}",
            }
        )
    return records


def demo_sessions() -> list[dict[str, Any]]:
    """The records of `sessions.jsonl`, in time order."""
    start_us = _start_us()
    records = []
    number = 0
    for hour in range(SESSIONS_HOURS):
        for _ in range(SESSIONS_PER_HOUR - 2 + _draw("sessions-per-hour", hour) % 5):
            offset_ms = _draw("session-offset", number) % 3_600_000
            records.append(
                {
                    "id": f"ses-{number:06d}",
                    "occurredAt": format_instant(start_us + hour * 3600 * _US_PER_S + offset_ms * 1000),
                    "jurisdiction": _pick(["US"] * 12 + ["CA"] * 3 + ["DE"], "session-jurisdiction", number),
                    "consentGranted": _percent("session-consent", number) >= 4,
                    "retentionExpiresAt": "2030-01-01T00:00:00Z",
                    "converted": _percent("session-converted", number) < 90,
                    "pages": 1 + _draw("session-pages", number) % 12,
                    "durationSeconds": 5 + _draw("session-duration", number) % 900,
                }
            )
            number += 1
    records.sort(key=lambda r: (r["occurredAt"], r["id"]))
    return records


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    lines = [compact_text(r) for r in records]
    return ("\n".join(lines) + "\n").encode("utf-8")


def generate_demo_data(directory: str | os.PathLike[str]) -> list[Path]:
    """Write the demo sources into `directory` (created if needed); returns their paths."""
    target = Path(directory)
    written = []
    sources = ((EVENTS_FILE, demo_events()), (LEDGERS_FILE, demo_ledgers()), (SESSIONS_FILE, demo_sessions()))
    for name, records in sources:
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, _jsonl(records))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pcbo_dagster.datasets.demo_data DIRECTORY", file=sys.stderr)
        return 2
    for path in generate_demo_data(args[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
