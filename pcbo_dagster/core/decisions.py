"""Record decisions (CONTRACT section 2), evaluated column-wise with pyarrow compute.

The only per-record Python work is pulling the five known fields out of the JSON objects into
columns (and writing a `detail` text for the rare invalid record); every rule runs on Arrow arrays.
Input order never matters: outputs are sorted, and duplicate handling depends on canonical forms,
not positions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import is_, is_not
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pcbo_dagster.core.canonical import fast_jcs, json_integer, prefixed
from pcbo_dagster.core.instants import parse_instants
from pcbo_dagster.core.memory import release_memory
from pcbo_dagster.core.plan import Partition, Plan, normalize_jurisdictions

DECISIONS_VERSION = "pcbo.decisions/1"
INVALID_RECORD = "INVALID_RECORD"
OUT_OF_WINDOW = "OUT_OF_WINDOW"
CONSENT_MISSING = "CONSENT_MISSING"
JURISDICTION_NOT_ALLOWED = "JURISDICTION_NOT_ALLOWED"
RETENTION_EXPIRED = "RETENTION_EXPIRED"
ALREADY_PRESENT = "ALREADY_PRESENT"
DUPLICATE_ID = "DUPLICATE_ID"
#: Partition-level omission reasons in their fixed order; bit i of a mask is REASONS[i].
REASONS = (CONSENT_MISSING, JURISDICTION_NOT_ALLOWED, RETENTION_EXPIRED, ALREADY_PRESENT, DUPLICATE_ID)
_POLICY_MASK = 0b111
_REASONS_BY_MASK = [[r for bit, r in enumerate(REASONS) if mask >> bit & 1] for mask in range(32)]
# Joined with "," (below every character of a reason name) the strings sort exactly as the lists do.
_REASON_KEYS = pa.array([",".join(reasons) for reasons in _REASONS_BY_MASK], pa.string())


@dataclass
class PartitionDecision:
    partition: Partition
    add: list[str]
    add_indices: np.ndarray  # the adds' input positions, in `add` order
    omit: list[dict[str, Any]]
    counts: dict[str, Any]
    #: What the source reads the adds back by (`LoadedRequest.fetch`): input positions for records
    #: held in memory, a streamed source's locators otherwise.
    add_locators: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    add_occurred_us: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    add_retention_us: pa.Array = field(default_factory=lambda: pa.array([], pa.int64()))
    #: The adds' raw SHA-256 digests as pass 1 took them, when the records are read again from a
    #: streamed source (which may change under the run): the records written must still have them.
    add_digests: list[bytes] | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.partition.to_json(), "add": self.add, "omit": self.omit, "counts": self.counts}


@dataclass
class Decisions:
    plan: Plan
    #: A list, or for a streamed source a sequence that reads each partition's decision from the
    #: decision spill when it is asked for (`engine.decision_spill`).
    partitions: Sequence[PartitionDecision]
    #: Likewise a list, or a sequence read from the spill (iterate it; do not keep it whole).
    unplaced: Sequence[dict[str, Any]]
    totals: dict[str, Any]
    breaches: list[dict[str, Any]] = field(default_factory=list)
    decision_hash: str = ""
    #: A directory source's files: read, pruned, not read (`RecordSource.file_report`); no decision.
    source_files: dict[str, Any] | None = None

    def source_files_json(self) -> dict[str, Any]:
        """`{"sourceFiles": ...}` for a document when the source is a directory, else nothing."""
        return {} if self.source_files is None else {"sourceFiles": self.source_files}

    def to_json(self, lazy: bool = False) -> dict[str, Any]:
        """The dry-run document; `lazy`: its `partitions` and `unplaced` as iterators, each entry made
        when it is reached (for a streamed source, read from its spill), for a writer that streams."""
        plan = self.plan.to_json()
        partitions = (p.to_json() for p in self.partitions)
        unplaced = iter(self.unplaced)
        return {
            "runId": plan["runId"],
            "dataset": plan["dataset"],
            "versionLabel": plan["versionLabel"],
            "planHash": plan["planHash"],
            "decisionHash": self.decision_hash,
            "partitions": partitions if lazy else list(partitions),
            "unplaced": unplaced if lazy else list(unplaced),
            "totals": self.totals,
            **self.source_files_json(),
        }


def _strings(values: list[Any]) -> pa.Array:
    """A string array of `values`, null where a value is not a JSON string."""
    try:
        return pa.array(values, pa.string())  # the common case: all strings (or null), in C
    except (pa.ArrowException, TypeError, ValueError):
        return pa.array([v if type(v) is str else None for v in values], pa.string())


def _integers(values: list[Any]) -> pa.Array:
    """An int64 array of `values`, null where a value is not a JSON integer (booleans are not). A
    number is judged by its RFC 8785 form (`json_integer`): `5.0` is the integer `5`, as `5` is, so
    copies of a record that differ only so are decided alike whichever comes first."""
    return pa.array(
        [v if type(v) is int and -(2**63) <= v < 2**63 else json_integer(v) for v in values], pa.int64()
    )


@dataclass
class RecordColumns:
    """What `decide` needs of each record, as Arrow arrays (one entry a record, in input order).

    Built from a list of records by `known_columns` (one batch at a time for a streamed source):
    about 60 bytes a record plus the id and jurisdiction texts.
    """

    is_object: pa.Array  # bool
    id_str: pa.Array  # string: the id where it is a JSON string, else null
    occ_us: pa.Array  # int64 microseconds, null where absent or invalid
    ret_us: pa.Array  # int64 microseconds, null where absent or invalid
    consent: pa.Array  # bool
    jurisdiction: pa.Array  # string
    position: pa.Array | None  # int64 ledger sequence (None for a time window)
    valid: pa.Array  # bool
    detail: pa.Array  # string: why an invalid record is invalid, null for valid ones

    def __len__(self) -> int:
        return len(self.is_object)


def _non_empty(ids: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(ids, ""), pa.scalar(None, pa.string()), ids)


def known_columns(records: list[Any], ledger_field: str | None = None) -> RecordColumns:
    """Pull the known fields into typed columns (anything of the wrong JSON type becomes null),
    judge validity, and write the detail of each invalid record."""
    all_objects = all(type(r) is dict for r in records)
    objs = records if all_objects else [r if type(r) is dict else {} for r in records]

    def field_values(name: str) -> list[Any]:  # one field of every record, pulled out in C
        return list(map(dict.get, objs, repeat(name)))

    raw_ids = field_values("id")
    raw_occ = field_values("occurredAt")
    raw_ret = field_values("retentionExpiresAt")
    id_str = _strings(raw_ids)
    is_object = pa.array(
        [True] * len(records) if all_objects else [type(r) is dict for r in records], pa.bool_()
    )
    occ_us = parse_instants(_strings(raw_occ))
    ret_us = parse_instants(_strings(raw_ret))
    ret_given = pa.array(list(map(is_not, raw_ret, repeat(None))), pa.bool_())
    ret_bad = pc.and_(ret_given, pc.is_null(ret_us))
    valid = pc.and_(pc.and_(is_object, pc.is_valid(_non_empty(id_str))), pc.is_valid(occ_us))
    valid = pc.and_(valid, pc.invert(ret_bad))
    position = None
    if ledger_field is not None:
        position = _integers([o.get(ledger_field) for o in objs])
        valid = pc.and_(valid, pc.is_valid(position))
    valid = pc.fill_null(valid, False)
    valid_np = valid.to_numpy(zero_copy_only=False)
    details: list[str | None] = [None] * len(records)
    invalid = np.flatnonzero(~valid_np).tolist()
    if invalid:
        occ_ok_np = pc.is_valid(occ_us).to_numpy(zero_copy_only=False)
        is_object_np = is_object.to_numpy(zero_copy_only=False)
        ret_bad_np = ret_bad.to_numpy(zero_copy_only=False)
        position_ok_np = None if position is None else pc.is_valid(position).to_numpy(zero_copy_only=False)
        for index in invalid:
            details[index] = _invalid_detail(
                bool(is_object_np[index]),
                raw_ids[index],
                raw_occ[index],
                bool(occ_ok_np[index]),
                bool(ret_bad_np[index]),
                None
                if position_ok_np is None or position_ok_np[index]
                else f"{ledger_field} is missing or not an integer",
            )
    return RecordColumns(
        is_object=is_object,
        id_str=id_str,
        occ_us=occ_us,
        ret_us=ret_us,
        consent=pa.array(list(map(is_, field_values("consentGranted"), repeat(True))), pa.bool_()),
        jurisdiction=_strings(field_values("jurisdiction")),
        position=position,
        valid=valid,
        detail=pa.array(details, pa.string()),
    )


def _invalid_detail(
    is_object: bool, raw_id: Any, raw_occ: Any, occ_ok: bool, ret_bad: bool, ledger_problem: str | None = None
) -> str:
    if not is_object:
        return "record is not a JSON object"
    problems = []
    if raw_id is None:
        problems.append("id is missing")
    elif type(raw_id) is not str:
        problems.append("id is not a string")
    elif raw_id == "":
        problems.append("id is empty")
    if raw_occ is None:
        problems.append("occurredAt is missing")
    elif type(raw_occ) is not str:
        problems.append("occurredAt is not a string")
    elif not occ_ok:
        problems.append("occurredAt is not an ISO-8601 instant with seconds and an explicit offset")
    if ret_bad:
        problems.append("retentionExpiresAt is not an ISO-8601 instant with seconds and an explicit offset")
    if ledger_problem:
        problems.append(ledger_problem)
    return "; ".join(problems)


def _bit(condition: pa.Array, bit: int) -> pa.Array:
    return pc.multiply(pc.cast(pc.fill_null(condition, True), pa.int32()), 1 << bit)


def _duplicate_flags(ids: pa.Array, digests: pa.Array) -> pa.Array:
    """True for copies that get DUPLICATE_ID: every copy when the occurrences differ; all but one
    (the lowest index, arbitrary since they are equal) when they are the same record."""
    n = len(ids)
    flags = np.zeros(n, dtype=bool)
    if n < 2:
        return pa.array(flags)
    # Most ids are unique: find those seen more than once by sorting (neighbours equal), which needs
    # far less memory than hashing every id, then group only those.
    order = pc.sort_indices(ids)
    sorted_ids = ids.take(order)
    equal = pc.fill_null(pc.equal(sorted_ids.slice(1), sorted_ids.slice(0, n - 1)), False)
    equal_np = equal.to_numpy(zero_copy_only=False)
    del sorted_ids, equal
    repeated = np.zeros(n, dtype=bool)
    repeated[1:] |= equal_np
    repeated[:-1] |= equal_np
    picked = pa.array(np.sort(order.to_numpy()[repeated]), pa.int64())
    if not len(picked):
        return pa.array(flags)
    table = pa.table({"idx": picked, "id": ids.take(picked), "digest": digests.take(picked)})
    if pa.types.is_fixed_size_binary(table.schema.field("digest").type):
        table = table.set_column(2, "digest", table["digest"].cast(pa.binary()))
    grouped = table.group_by("id").aggregate([("idx", "count"), ("idx", "min"), ("digest", "count_distinct")])
    grouped = grouped.filter(pc.greater(grouped["idx_count"], 1))
    if grouped.num_rows:
        joined = table.join(grouped, keys="id", join_type="inner")
        differ = pc.greater(joined["digest_count_distinct"], 1)
        not_first = pc.not_equal(joined["idx"], joined["idx_min"])
        dup = pc.or_(differ, not_first)
        flags[joined["idx"].to_numpy()[dup.to_numpy(zero_copy_only=False)]] = True
    return pa.array(flags)


def decide(
    plan: Plan, records: list[Any], record_digests: list[str] | bytes, existing_ids: list[str]
) -> Decisions:
    """Evaluate every record against the plan's window and policies. `record_digests`: each record's
    hex digest, or the raw 32-byte digests concatenated (`canonical.record_digest_bytes`)."""
    if isinstance(record_digests, bytes):
        n = len(record_digests) // 32
        digests = pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), n, [None, pa.py_buffer(record_digests)])
    else:
        digests = pa.array(record_digests, pa.string())
    return decide_columns(plan, known_columns(records, plan.ledger_field), digests, existing_ids)


@dataclass
class RecordMasks:
    """The per-record outcome of the rules that need no other record (everything but DUPLICATE_ID)."""

    placed: np.ndarray  # bool: valid and inside the window
    pidx: np.ndarray  # int64 partition index (meaningless where not placed)
    mask: np.ndarray  # int32 reason bits 0-3 (REASONS), DUPLICATE_ID not yet set
    ids: pa.Array  # string: the id where it is a non-empty string, else null (for DUPLICATE_ID)


def record_masks(plan: Plan, cols: RecordColumns, existing_ids: list[str]) -> RecordMasks:
    """Placement and the per-record reasons of `cols` (all records, or one batch of a streamed source)."""
    n = len(cols)
    ids = _non_empty(cols.id_str)
    position = cols.occ_us if plan.ledger_field is None else cols.position
    in_window = pc.and_(
        pc.greater_equal(position, pa.scalar(plan.start, pa.int64())),
        pc.less(position, pa.scalar(plan.end, pa.int64())),
    )
    placed = pc.fill_null(pc.and_(cols.valid, in_window), False).to_numpy(zero_copy_only=False)
    policies = plan.policies
    mask = pa.array(np.zeros(n, dtype=np.int32))
    if policies.require_consent:
        mask = pc.add(mask, _bit(pc.invert(cols.consent), 0))
    if policies.allowed_jurisdictions is not None:
        allowed = pa.array(list(policies.allowed_jurisdictions), pa.string())
        ok = pc.is_in(normalize_jurisdictions(cols.jurisdiction), value_set=allowed)
        mask = pc.add(mask, _bit(pc.invert(ok), 1))
    if policies.retention_cutoff_us is not None:
        mask = pc.add(
            mask, _bit(pc.less_equal(cols.ret_us, pa.scalar(policies.retention_cutoff_us, pa.int64())), 2)
        )
    if existing_ids:
        present = pc.is_in(ids, value_set=pa.array(existing_ids, pa.string()))
        mask = pc.add(mask, pc.multiply(pc.cast(pc.fill_null(present, False), pa.int32()), 1 << 3))
    offsets = pc.subtract(pc.fill_null(position, plan.start), pa.scalar(plan.start, pa.int64()))
    width = pa.scalar(plan.width, pa.int64())
    pidx = pc.divide(pc.max_element_wise(offsets, pa.scalar(0, pa.int64())), width)
    return RecordMasks(
        placed=placed,
        pidx=pidx.to_numpy(zero_copy_only=False).astype(np.int64, copy=False),
        mask=mask.to_numpy(zero_copy_only=False).astype(np.int32, copy=False),
        ids=ids,
    )


def out_of_window_detail(plan: Plan) -> str:
    if plan.ledger_field is not None:
        return f"{plan.ledger_field} is outside the ledger range"
    return "occurredAt is outside [start, end)"


def unplaced_entry(index: int, entry_id: str | None, detail: str | None, outside: str) -> dict[str, Any]:
    """One `unplaced` entry: INVALID_RECORD with its detail, else OUT_OF_WINDOW."""
    return {
        "index": index,
        "id": entry_id,
        "reasons": [INVALID_RECORD] if detail is not None else [OUT_OF_WINDOW],
        "detail": detail if detail is not None else outside,
    }


def sort_placed(table: pa.Table) -> pa.Table:
    """Placed records (`pidx`, `id`, `mask`, ...) in output order: partition, id bytes, then reasons."""
    table = table.append_column("reason_key", pc.take(_REASON_KEYS, table["mask"]))
    return table.sort_by([("pidx", "ascending"), ("id", "ascending"), ("reason_key", "ascending")])


def partition_decision(
    part: Partition,
    ids: list[str],
    masks: np.ndarray,
    idxs: np.ndarray,
    locators: np.ndarray,
    occurred_us: np.ndarray,
    retention_us: pa.Array,
    on_violation: str,
    digests: list[bytes] | None = None,
) -> tuple[PartitionDecision, list[dict[str, Any]]]:
    """A partition's decision from its placed records in output order (`sort_placed`), and its
    breaches (listed only where they block)."""
    adds_sel = masks == 0
    add_at = np.flatnonzero(adds_sel)
    add_ids = [ids[i] for i in add_at.tolist()]
    omit = [{"id": ids[i], "reasons": _REASONS_BY_MASK[masks[i]]} for i in np.flatnonzero(~adds_sel).tolist()]
    breaches: list[dict[str, Any]] = []
    if on_violation == "block":
        breaches = [
            {"partition": part.key, "id": ids[i], "reasons": _REASONS_BY_MASK[masks[i] & _POLICY_MASK]}
            for i in np.flatnonzero(masks & _POLICY_MASK).tolist()
        ]
    by_reason = {reason: int(np.count_nonzero(masks >> bit & 1)) for bit, reason in enumerate(REASONS)}
    take = pa.array(add_at, pa.int64())
    decision = PartitionDecision(
        partition=part,
        add=add_ids,
        add_indices=idxs[adds_sel],
        omit=omit,
        counts={"source": len(ids), "add": len(add_ids), "omit": len(omit), "byReason": by_reason},
        add_locators=locators[adds_sel],
        add_occurred_us=occurred_us[adds_sel],
        add_retention_us=retention_us.take(take),
        add_digests=None if digests is None else [digests[i] for i in add_at.tolist()],
    )
    return decision, breaches


def make_totals(
    records: int, placed: int, partitions: list[dict[str, Any]], invalid: int, out_of_window: int
) -> dict[str, Any]:
    """The dry-run `totals` from the partitions' `counts` and the unplaced counts."""
    return {
        "records": records,
        "placed": placed,
        "add": sum(c["add"] for c in partitions),
        "omit": sum(c["omit"] for c in partitions),
        "unplaced": invalid + out_of_window,
        "byReason": {
            INVALID_RECORD: invalid,
            OUT_OF_WINDOW: out_of_window,
            **{reason: sum(c["byReason"][reason] for c in partitions) for reason in REASONS},
        },
    }


def decide_columns(plan: Plan, cols: RecordColumns, digests: pa.Array, existing_ids: list[str]) -> Decisions:
    """`decide` on the records' columns; `digests` (string or fixed-size binary) identify equal records."""
    n = len(cols)
    occ_us, ret_us = cols.occ_us, cols.ret_us
    masks = record_masks(plan, cols, existing_ids)
    duplicates = _duplicate_flags(masks.ids, digests).to_numpy(zero_copy_only=False)
    mask = masks.mask | duplicates.astype(np.int32) << 4
    release_memory()  # the hash tables of the duplicate search, before the Python work below

    # Unplaced records, by input index.
    outside = out_of_window_detail(plan)
    placed_np = masks.placed
    unplaced_idx = np.flatnonzero(~placed_np)
    take = pa.array(unplaced_idx, pa.int64())
    unplaced = [
        unplaced_entry(index, entry_id, detail, outside)
        for index, entry_id, detail in zip(
            unplaced_idx.tolist(),
            cols.id_str.take(take).to_pylist(),
            cols.detail.take(take).to_pylist(),
            strict=True,
        )
    ]

    # Placed records: sort by partition, id bytes, then reasons.
    placed = pa.array(placed_np)
    table = sort_placed(
        pa.table(
            {
                "idx": pa.array(np.arange(n, dtype=np.int64)),
                "pidx": pa.array(masks.pidx),
                "id": masks.ids,
                "mask": pa.array(mask),
            }
        ).filter(placed)
    )
    pidx = table["pidx"].to_numpy()
    sorted_masks = table["mask"].to_numpy()
    ids = table["id"].to_pylist()
    idxs = table["idx"].to_numpy()
    order = pa.array(idxs, pa.int64())
    occurred = occ_us.take(order).to_numpy(zero_copy_only=False)
    retention = ret_us.take(order)
    bounds = np.searchsorted(pidx, np.arange(len(plan.partitions) + 1))

    partitions: list[PartitionDecision] = []
    breaches: list[dict[str, Any]] = []
    for part in plan.partitions:
        lo, hi = int(bounds[part.index]), int(bounds[part.index + 1])
        decision, blocking = partition_decision(
            part,
            ids[lo:hi],
            sorted_masks[lo:hi],
            idxs[lo:hi],
            idxs[lo:hi],
            occurred[lo:hi],
            retention.slice(lo, hi - lo),
            plan.policies.on_violation,
        )
        partitions.append(decision)
        breaches.extend(blocking)

    invalid = sum(1 for u in unplaced if u["reasons"][0] == INVALID_RECORD)
    decisions = Decisions(
        plan=plan,
        partitions=partitions,
        unplaced=unplaced,
        totals=make_totals(
            n, int(placed_np.sum()), [p.counts for p in partitions], invalid, len(unplaced) - invalid
        ),
        breaches=breaches,
    )
    decisions.decision_hash = decision_hash(decisions)
    return decisions


class DecisionHasher:
    """`decision_hash` fed a partition and an unplaced entry at a time (a streamed source's decisions
    are never all in memory): the canonical text of the document is hashed as it is made (JCS is
    compositional: an object's text is its members' texts, keys sorted)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256(b'{"partitions":[')
        self._stage = "partitions"
        self._first = True

    def _item(self, value: Any) -> None:
        self._sha.update(fast_jcs(value) if self._first else b"," + fast_jcs(value))
        self._first = False

    def add_partition(self, pd: PartitionDecision) -> None:
        assert self._stage == "partitions"
        self._item({"key": pd.partition.key, "add": pd.add, "omit": pd.omit})

    def start_unplaced(self, plan_hash: str) -> None:
        assert self._stage == "partitions"
        self._sha.update(b'],"planHash":' + fast_jcs(plan_hash) + b',"unplaced":[')
        self._stage, self._first = "unplaced", True

    def add_unplaced(self, entry: dict[str, Any]) -> None:
        assert self._stage == "unplaced"
        self._item({"index": entry["index"], "id": entry["id"], "reasons": entry["reasons"]})

    def result(self) -> str:
        assert self._stage == "unplaced"
        self._sha.update(b'],"v":' + fast_jcs(DECISIONS_VERSION) + b"}")
        self._stage = "done"
        return prefixed(self._sha.hexdigest())


def decision_hash(decisions: Decisions) -> str:
    """CONTRACT section 3's `decisionHash` of `decisions`, through `DecisionHasher`."""
    hasher = DecisionHasher()
    for pd in decisions.partitions:
        hasher.add_partition(pd)
    hasher.start_unplaced(decisions.plan.plan_hash)
    for entry in decisions.unplaced:
        hasher.add_unplaced(entry)
    return hasher.result()
