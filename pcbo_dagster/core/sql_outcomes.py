"""What a backfill does to each row of a SQL table (issue 15): the conflict matrix, the freshness and
deletion gates, and the decisions document of a SQL target, whose hash pins the live table.

Pure: the live rows come in as `LiveState`s (`targets/sql_table.py` reads them). For each record a
partition adds, against the row with its key in the table:

| the live row                                            | outcome          | written |
|---------------------------------------------------------|------------------|---------|
| absent                                                  | `insert`         | yes     |
| tombstoned (`deletedColumn`) after `snapshotAt`          | `refused_deleted`| no      |
| present, not tombstoned, equal on the written columns   | `skip_equal`     | no      |
| present, `freshnessColumn` later than `snapshotAt`      | `refused_newer`  | no (unless `allowNewer`) |
| present and different, `conflict: overwrite`            | `update`         | yes     |
| present and different, `conflict: skip`                 | `skip_conflict`  | no      |
| present and different, `conflict: fail`                 | `conflict`       | execute is blocked (exit 3) |

A tombstone older than the snapshot makes the row "different" (the record says the key exists): the
conflict policy decides, and `overwrite` clears the tombstone. A record whose key has a null column
cannot name a row: `invalid_key` (never written, listed as a failure).

**The decision hash of a SQL target.** The policy decisions are the CONTRACT's, computed by the same
code as for a lake (their hash is `policyDecisionHash`, byte-identical to a lake target's
`decisionHash` for the same request). The `decisionHash` of a SQL target is the hash of

    {"v": "pcbo.decisions.sql/1", "policyDecisionHash", "target": <descriptor>,
     "partitions": [{"key", "outcomes": [[id, outcome, liveDigest | null], ...]}]}

with the outcomes of each partition's adds in id order. `liveDigest` is the digest of the live row as
read (its written columns, its freshness and tombstone values): an approved dry-run
(`expectedDecisionHash`) goes stale when any row it would touch, skip or refuse changed, or when the
target's settings did.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from pcbo_dagster.core.canonical import fast_jcs, jcs, prefixed, sha256_hex
from pcbo_dagster.core.decisions import Decisions
from pcbo_dagster.core.instants import format_instant, parse_instant, to_micros

SQL_DECISIONS_VERSION = "pcbo.decisions.sql/1"

INSERT = "insert"
UPDATE = "update"
SKIP_EQUAL = "skip_equal"
SKIP_CONFLICT = "skip_conflict"
CONFLICT = "conflict"
REFUSED_NEWER = "refused_newer"
REFUSED_DELETED = "refused_deleted"
INVALID_KEY = "invalid_key"
OUTCOMES = (INSERT, UPDATE, SKIP_EQUAL, SKIP_CONFLICT, CONFLICT, REFUSED_NEWER, REFUSED_DELETED, INVALID_KEY)
#: The outcomes that change the table.
WRITES = (INSERT, UPDATE)

_CANONICAL_INSTANT = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{6})?Z$")
#: Value kinds of the run's columns (the parquet mapping's types, `core/record_table.py`).
STRING, JSON_TEXT, INTEGER, FLOAT, BOOLEAN, TIMESTAMP = "string", "json", "int", "float", "bool", "timestamp"


#: A freshness or tombstone value that cannot be read as an instant counts as later than any snapshot
#: (fail closed: an unreadable `updated_at` never lets a backfill overwrite a live row).
UNREADABLE_INSTANT = 2**62
_UNREADABLE = "unreadable"


def _instant_text(micros: int | None) -> str | None:
    if micros is None:
        return None
    return _UNREADABLE if micros == UNREADABLE_INSTANT else format_instant(micros)


def _instant_of_text(text: str | None) -> int | None:
    if text is None:
        return None
    return UNREADABLE_INSTANT if text == _UNREADABLE else parse_instant(text)


@dataclass(frozen=True)
class LiveState:
    """A live row as the outcome needs it: the digest of its written columns (compared with the
    record's), its freshness and tombstone instants, and the digest of all three (`live_digest`,
    pinned by the decision hash)."""

    row_digest: str
    fresh_us: int | None
    deleted_us: int | None
    live_digest: str

    def to_json(self) -> dict[str, Any]:
        return {
            "rowDigest": self.row_digest,
            "fresh": _instant_text(self.fresh_us),
            "deleted": _instant_text(self.deleted_us),
            "liveDigest": self.live_digest,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> LiveState:
        return cls(
            value["rowDigest"],
            _instant_of_text(value["fresh"]),
            _instant_of_text(value["deleted"]),
            value["liveDigest"],
        )


def live_state(row_values: Sequence[Any], fresh_us: int | None, deleted_us: int | None) -> LiveState:
    """The `LiveState` of a row from its canonical written values (`canonical_value`)."""
    state = [*row_values, _instant_text(fresh_us), _instant_text(deleted_us)]  # one flat list
    return LiveState(
        row_digest(row_values), fresh_us, deleted_us, prefixed(sha256_hex(canonical_bytes(state)))
    )


def classify(
    record_digest: str,
    live: LiveState | None,
    conflict: str,
    snapshot_us: int | None,
    freshness: bool,
    allow_newer: bool,
) -> str:
    """The conflict matrix and gates (module doc) for one record against its live row."""
    if live is None:
        return INSERT
    if live.deleted_us is not None and snapshot_us is not None and live.deleted_us > snapshot_us:
        return REFUSED_DELETED
    if live.deleted_us is None and live.row_digest == record_digest:
        return SKIP_EQUAL
    if freshness and not allow_newer and live.fresh_us is not None and snapshot_us is not None:
        if live.fresh_us > snapshot_us:
            return REFUSED_NEWER
    return {"overwrite": UPDATE, "skip": SKIP_CONFLICT}.get(conflict, CONFLICT)


# -- canonical values: one digest for a record's row and a row read from the table ------------------


def canonical_value(kind: str, value: Any) -> Any:
    """A column value as JSON, the same whether it comes from a record (as written) or from the
    table (as the driver reads it back): instants as `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, numbers as
    numbers, JSON values as their RFC 8785 text. A value that cannot be one of `kind` is tagged
    (`["?", type, text]`), so it never equals a record's."""
    if value is None:
        return None
    if kind == TIMESTAMP:
        if isinstance(value, datetime) and value.tzinfo is not None:
            return format_instant(to_micros(value))
        if isinstance(value, str):
            if _CANONICAL_INSTANT.match(value) and not value.endswith(".000000Z"):
                return value  # already as written (a SQLite target stores instants so)
            micros = parse_instant(value)
            if micros is not None:
                return format_instant(micros)
    elif kind == BOOLEAN:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif kind == INTEGER:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, float | Decimal) and math.isfinite(value) and value == int(value):
            return int(value)
    elif kind == FLOAT:
        if isinstance(value, int | float | Decimal) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif kind == JSON_TEXT:
        if isinstance(value, str):
            return value
        if isinstance(value, dict | list):
            return jcs(value).decode("utf-8")
    elif isinstance(value, str):
        return value
    return ["?", type(value).__name__, str(value)]


def canonical_bytes(value: Any) -> bytes:
    """RFC 8785 of a value whose floats, if any, sit in its top-level list (canonical row values):
    through `fast_jcs` when there are none, else `rfc8785`."""
    if isinstance(value, list) and any(isinstance(v, float) for v in value):
        return jcs(value)
    return fast_jcs(value)


def row_digest(values: Sequence[Any]) -> str:
    """`sha256:` of the RFC 8785 list of a row's canonical written values (in column order)."""
    return prefixed(hashlib.sha256(canonical_bytes(list(values))).hexdigest())


def key_text(values: Sequence[Any]) -> str:
    """A row's key as one text (RFC 8785 of its canonical key values): how rows are matched."""
    return canonical_bytes(list(values)).decode("utf-8")


# -- the decisions of a SQL target --------------------------------------------------------------------


@dataclass(frozen=True)
class RecordOutcome:
    """One added record's outcome against the live table."""

    id: str
    outcome: str
    live: LiveState | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "outcome": self.outcome,
            "liveDigest": None if self.live is None else self.live.live_digest,
        }


def outcome_counts(outcomes: Sequence[RecordOutcome]) -> dict[str, int]:
    """How many records of each outcome (every outcome listed)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for o in outcomes:
        counts[o.outcome] += 1
    return counts


def outcome_entry(o: RecordOutcome) -> list[Any]:
    """One record's entry in the SQL decisions document: [id, outcome, liveDigest | null]."""
    return [o.id, o.outcome, None if o.live is None else o.live.live_digest]


def partition_outcomes_entry(key: str, outcomes: Sequence[RecordOutcome]) -> dict[str, Any]:
    """A partition's entry in the SQL decisions document."""
    return {"key": key, "outcomes": [outcome_entry(o) for o in outcomes]}


def outcomes_digest(key: str, outcomes: Sequence[RecordOutcome]) -> str:
    """`sha256:` of a partition's entry (what an apply intent says it is about to do)."""
    return outcomes_digest_of(key, [outcome_entry(o) for o in outcomes])


def outcomes_digest_of(key: str, entries: Sequence[Sequence[Any]]) -> str:
    """`outcomes_digest` of a partition's outcome entries ([id, outcome, liveDigest | null], id order),
    as chunk checkpoints record them."""
    return prefixed(sha256_hex(fast_jcs({"key": key, "outcomes": [list(e) for e in entries]})))


class RowsDigest:
    """`sha256:` of the RFC 8785 list of a partition's adds as rows, `[id, key text, row digest]` in
    id order: what an apply intent records of the rows it is about to write (`rows_digest`), so the
    key text and digest a chunk checkpoint claims for each row are bound to the chain. A chunk at a
    time (RFC 8785 of a list is its items' forms joined)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256(b"[")
        self._first = True

    def add(self, record_id: str, key_text: str, digest: str) -> None:
        item = fast_jcs([record_id, key_text, digest])
        self._sha.update(item if self._first else b"," + item)
        self._first = False

    def result(self) -> str:
        sha = self._sha.copy()
        sha.update(b"]")
        return prefixed(sha.hexdigest())


class SqlDecisionHasher:
    """The SQL `decisionHash` (module doc), a partition at a time (RFC 8785 is compositional)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256(b'{"partitions":[')
        self._first = True

    def add_partition(self, key: str, outcomes: Sequence[RecordOutcome]) -> None:
        text = fast_jcs(partition_outcomes_entry(key, outcomes))
        self._sha.update(text if self._first else b"," + text)
        self._first = False

    def result(self, policy_decision_hash: str, descriptor: dict[str, Any]) -> str:
        self._sha.update(b'],"policyDecisionHash":' + jcs(policy_decision_hash))
        self._sha.update(b',"target":' + jcs(descriptor) + b',"v":' + jcs(SQL_DECISIONS_VERSION) + b"}")
        return prefixed(self._sha.hexdigest())


@dataclass
class TargetDecisions(Decisions):
    """The decisions of a request with a SQL target: the CONTRACT's (the same evaluation as for a
    lake), each partition's outcomes against the live table, and the SQL `decision_hash`."""

    policy_decision_hash: str = ""
    descriptor: dict[str, Any] = field(default_factory=dict)
    #: Per partition key, its adds' outcomes in id order.
    outcomes: dict[str, list[RecordOutcome]] = field(default_factory=dict)
    #: Per partition key, the `RowsDigest` of its adds.
    rows_digests: dict[str, str] = field(default_factory=dict)
    #: The journal key of the run (`ChainState.sql_journal_key`) whose entries said what the rows it
    #: already changed were before it; None: none.
    journal_key: str | None = None
    #: What the dry-run says of that journal (`sql_apply._journal_note`: `targetJournal`).
    journal_note: dict[str, Any] = field(default_factory=dict)

    def conflicts(self) -> list[dict[str, Any]]:
        """The records `conflict: fail` blocks on."""
        return [
            {"partition": key, "id": o.id, "outcome": o.outcome}
            for key, outcomes in self.outcomes.items()
            for o in outcomes
            if o.outcome == CONFLICT
        ]

    def target_totals(self) -> dict[str, int]:
        totals = dict.fromkeys(OUTCOMES, 0)
        for outcomes in self.outcomes.values():
            for name, count in outcome_counts(outcomes).items():
                totals[name] += count
        return totals

    def to_json(self, lazy: bool = False) -> dict[str, Any]:
        document = super().to_json(lazy=lazy)
        partitions = document["partitions"]

        def with_target(entries: Any) -> Iterator[dict[str, Any]]:
            for entry in entries:
                outcomes = self.outcomes.get(entry["key"], [])
                entry["target"] = {
                    "counts": outcome_counts(outcomes),
                    "outcomes": [o.to_json() for o in outcomes],
                }
                yield entry

        document["partitions"] = with_target(partitions) if lazy else list(with_target(partitions))
        document["policyDecisionHash"] = self.policy_decision_hash
        document["target"] = self.descriptor
        document["targetTotals"] = self.target_totals()
        document["targetJournal"] = self.journal_note
        return document
