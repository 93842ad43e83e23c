"""The partition plan and its hash (CONTRACT sections 1 and 3).

A plan cuts a window of positions into partitions of equal width (the last may be shorter). For a
time window the positions are microseconds since the epoch (`occurredAt`); for a ledger range (an
extension, see the README) they are ledger sequence numbers read from a record field.
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pcbo_dagster.core.canonical import fast_jcs, prefixed, sha256_hex
from pcbo_dagster.core.instants import format_instant, parse_instant
from pcbo_dagster.core.partition_keys import LedgerGrid, format_time_key
from pcbo_dagster.core.request_model import BackfillRequest, Policies

PLAN_VERSION = "pcbo.plan/1"


class PartitionWindow(TypedDict):
    """A planned partition as outputs, manifests and events show it: its position in the plan, key,
    and bounds (instants, or ledger sequences for a ledger range)."""

    index: int
    key: str
    start: str | int
    end: str | int


@dataclass(frozen=True)
class Partition:
    index: int
    key: str
    start: int  # first position (inclusive): microseconds, or a ledger sequence
    end: int  # last position (exclusive)
    ledger: bool = False

    def to_json(self) -> PartitionWindow:
        if self.ledger:
            return {"index": self.index, "key": self.key, "start": self.start, "end": self.end}
        return {
            "index": self.index,
            "key": self.key,
            "start": format_instant(self.start),
            "end": format_instant(self.end),
        }


@dataclass(frozen=True)
class NormalizedPolicies:
    """Policies as the engine applies them and the plan hash carries them (CONTRACT section 3)."""

    require_consent: bool
    allowed_jurisdictions: tuple[str, ...] | None
    retention_cutoff_us: int | None
    on_violation: str

    @classmethod
    def from_policies(cls, policies: Policies) -> NormalizedPolicies:
        """A request's or a dataset config's `policies`: jurisdictions trimmed, upper-cased
        (`normalize_jurisdictions`), unique and sorted; the retention cutoff as an instant."""
        allowed: tuple[str, ...] | None = None
        if policies.allowedJurisdictions is not None:
            normalized = normalize_jurisdictions(pa.array(policies.allowedJurisdictions, pa.string()))
            allowed = tuple(sorted(set(normalized.to_pylist())))
        cutoff = policies.retentionCutoff
        return cls(
            require_consent=policies.requireConsent,
            allowed_jurisdictions=allowed,
            retention_cutoff_us=None if cutoff is None else parse_instant(cutoff),
            on_violation=policies.onViolation,
        )

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> NormalizedPolicies:
        """Policies as `to_json` wrote them (a manifest's `policies`): already normalised, so taken
        as they are (a `KeyError` when a field is missing)."""
        allowed = document.get("allowedJurisdictions")
        cutoff = document.get("retentionCutoff")
        return cls(
            require_consent=document["requireConsent"],
            allowed_jurisdictions=None if allowed is None else tuple(allowed),
            retention_cutoff_us=None if cutoff is None else parse_instant(cutoff),
            on_violation=document["onViolation"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "requireConsent": self.require_consent,
            "allowedJurisdictions": None
            if self.allowed_jurisdictions is None
            else list(self.allowed_jurisdictions),
            "retentionCutoff": None
            if self.retention_cutoff_us is None
            else format_instant(self.retention_cutoff_us),
            "onViolation": self.on_violation,
        }


@dataclass(frozen=True)
class Plan:
    run_id: str
    dataset: str
    version_label: str
    start: int  # window start position (inclusive)
    end: int  # window end position (exclusive)
    width: int  # partition width in positions
    policies: NormalizedPolicies
    partitions: tuple[Partition, ...]
    plan_hash: str
    #: None for a time window (positions are `occurredAt`); else the record field with the ledger sequence.
    ledger_field: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "runId": self.run_id,
            "dataset": self.dataset,
            "versionLabel": self.version_label,
            "planHash": self.plan_hash,
            "partitions": [p.to_json() for p in self.partitions],
        }


#: The one letter Arrow's `utf8_upper` (utf8proc) upper-cases against Unicode's simple case mapping:
#: `ß` (U+00DF) has no simple upper-case mapping in UnicodeData.txt, but utf8proc maps it to `ẞ`
#: (U+1E9E) (apache/arrow#34599, JuliaStrings/utf8proc#130). It is put back, so `ß` stays `ß`.
_SHARP_S = "\u00df"


def normalize_jurisdictions(values: pa.Array) -> pa.Array:
    """Trim (Unicode whitespace) and upper-case with Unicode's *simple* case mapping: Arrow's
    `utf8_upper`, but for `ß`, which stays `ß` (utf8proc alone makes it `ẞ`; Python's `str.upper`
    makes it `SS`).

    The same function normalises the policy list and the records' jurisdictions, so the two always agree.
    """
    trimmed = pc.utf8_trim_whitespace(values.cast(pa.string()))
    upper = pc.utf8_upper(trimmed)
    has_sharp_s = pc.fill_null(pc.match_substring(trimmed, _SHARP_S), False)
    if not pc.any(has_sharp_s).as_py():
        return upper
    # Upper-case the text between the ß's and keep the ß's themselves (rare: only those strings).
    pieces = pc.split_pattern(trimmed.filter(has_sharp_s), _SHARP_S)
    joined = pc.binary_join(
        pa.ListArray.from_arrays(pieces.offsets, pc.utf8_upper(pieces.flatten())), _SHARP_S
    )
    return pc.replace_with_mask(upper, has_sharp_s, joined)


def partitions_for(start: int, end: int, width: int, ledger: bool = False) -> tuple[Partition, ...]:
    """[start, end) cut into partitions of `width` positions, the last one cut at `end`: time windows
    keyed by their start (`format_time_key`), or the ledger grid's partitions (`LedgerGrid`)."""
    if ledger:
        spans = LedgerGrid.of_request(start, end, width).spans()
        return tuple(Partition(i, s.key, s.first, s.end, True) for i, s in enumerate(spans))
    count = -(-(end - start) // width)
    parts = []
    for index in range(count):
        lo = start + index * width
        parts.append(Partition(index, format_time_key(lo), lo, min(lo + width, end)))
    return tuple(parts)


def _streamed_hash(document: dict[str, Any], sorted_digests: Iterable[np.ndarray]) -> str:
    """SHA-256 of `fast_jcs(document)` with `records` the hex texts of `sorted_digests` (raw digests
    in byte order, in (k, 32) uint8 chunks), without building them all: the canonical text around an
    empty `records` array is hashed, and the digests are hashed between, a chunk at a time. (No string
    value can hold the marker: its quotes would be escaped.)"""
    text = fast_jcs({**document, "records": []})
    marker = b'"records":['
    at = text.index(marker) + len(marker)
    sha = hashlib.sha256(text[:at])
    first = True
    for chunk in sorted_digests:
        if not len(chunk):
            continue
        if not first:
            sha.update(b",")
        sha.update(_quoted_hexes(chunk))
        first = False
    sha.update(text[at:])
    return sha.hexdigest()


_QUOTE, _COMMA = ord('"'), ord(",")


def _quoted_hexes(chunk: np.ndarray) -> memoryview:
    """The canonical text of a chunk's digests as array elements, `"<hex>","<hex>",...,"<hex>"` (each
    digest's 64 lower-case hex digits in quotes, comma-separated), as a flat byte buffer: every
    digest a (64 + 3)-byte row of one array, built by array writes, not by a string per digest."""
    digits = np.frombuffer(binascii.hexlify(np.ascontiguousarray(chunk).data), np.uint8).reshape(-1, 64)
    rows = np.empty((len(digits), 67), np.uint8)
    rows[:, 0] = rows[:, 65] = _QUOTE
    rows[:, 1:65] = digits
    rows[:, 66] = _COMMA
    return rows.reshape(-1)[:-1].data  # no comma after the last


def build_plan(request: BackfillRequest, record_digests: list[str] | Iterator[np.ndarray]) -> Plan:
    """The plan of a request; `record_digests` are the hex SHA-256 of JCS(record) of every record,
    or (a streamed source) an iterator of the raw digests in byte order, in (k, 32) uint8 chunks: the
    hash is the same."""
    policies = NormalizedPolicies.from_policies(request.policies)
    ledger = request.ledgerRange
    document: dict[str, Any] = {
        "v": PLAN_VERSION,
        "dataset": request.dataset,
        "versionLabel": request.versionLabel,
    }
    if ledger is None:
        start, end, width = request.start_us, request.end_us, request.chunk_us
        document.update(
            start=format_instant(start), end=format_instant(end), chunkSeconds=request.chunkSeconds
        )
    else:
        start, end, width = ledger.first, ledger.end, ledger.partitionSize
        document["ledgerRange"] = {"field": ledger.field, "first": start, "end": end, "partitionSize": width}
    document.update(policies=policies.to_json(), existingTargetIds=sorted(set(request.existingTargetIds)))
    if not isinstance(record_digests, list):
        plan_hex = _streamed_hash(document, record_digests)
    else:
        plan_hex = sha256_hex(fast_jcs({**document, "records": sorted(record_digests)}))
    return Plan(
        run_id=request.runId,
        dataset=request.dataset,
        version_label=request.versionLabel,
        start=start,
        end=end,
        width=width,
        policies=policies,
        partitions=partitions_for(start, end, width, ledger is not None),
        plan_hash=prefixed(plan_hex),
        ledger_field=None if ledger is None else ledger.field,
    )
