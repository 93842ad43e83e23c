"""The partition plan and its hash (CONTRACT sections 1 and 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pcbo_dagster.core.canonical import fast_jcs, prefixed, sha256_hex
from pcbo_dagster.core.instants import format_instant, format_key
from pcbo_dagster.core.request_model import BackfillRequest

PLAN_VERSION = "pcbo.plan/1"


@dataclass(frozen=True)
class Partition:
    index: int
    key: str
    start_us: int
    end_us: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "key": self.key,
            "start": format_instant(self.start_us),
            "end": format_instant(self.end_us),
        }


@dataclass(frozen=True)
class NormalizedPolicies:
    require_consent: bool
    allowed_jurisdictions: tuple[str, ...] | None
    retention_cutoff_us: int | None
    on_violation: str

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
    start_us: int
    end_us: int
    chunk_us: int
    policies: NormalizedPolicies
    partitions: tuple[Partition, ...]
    plan_hash: str

    def partition_of(self, occurred_us: int) -> int:
        return (occurred_us - self.start_us) // self.chunk_us

    def to_json(self) -> dict[str, Any]:
        return {
            "runId": self.run_id,
            "dataset": self.dataset,
            "versionLabel": self.version_label,
            "planHash": self.plan_hash,
            "partitions": [p.to_json() for p in self.partitions],
        }


def normalize_jurisdictions(values: pa.Array) -> pa.Array:
    """Trim (Unicode whitespace) and upper-case (Unicode simple case mapping), as Arrow does it.

    The same function normalises the policy list and the records' jurisdictions, so the two always agree.
    """
    return pc.utf8_upper(pc.utf8_trim_whitespace(values.cast(pa.string())))


def normalize_policies(request: BackfillRequest) -> NormalizedPolicies:
    allowed = request.policies.allowedJurisdictions
    normalized: tuple[str, ...] | None = None
    if allowed is not None:
        normalized = tuple(sorted(set(normalize_jurisdictions(pa.array(allowed, pa.string())).to_pylist())))
    return NormalizedPolicies(
        require_consent=request.policies.requireConsent,
        allowed_jurisdictions=normalized,
        retention_cutoff_us=request.retention_cutoff_us,
        on_violation=request.policies.onViolation,
    )


def partitions_for(start_us: int, end_us: int, chunk_us: int) -> tuple[Partition, ...]:
    count = -(-(end_us - start_us) // chunk_us)
    parts = []
    for index in range(count):
        p_start = start_us + index * chunk_us
        parts.append(Partition(index, format_key(p_start), p_start, min(p_start + chunk_us, end_us)))
    return tuple(parts)


def build_plan(request: BackfillRequest, record_digests: list[str]) -> Plan:
    """The plan of a request; `record_digests` are the hex SHA-256 of JCS(record) of every record."""
    policies = normalize_policies(request)
    start_us, end_us, chunk_us = request.start_us, request.end_us, request.chunk_us
    document = {
        "v": PLAN_VERSION,
        "dataset": request.dataset,
        "versionLabel": request.versionLabel,
        "start": format_instant(start_us),
        "end": format_instant(end_us),
        "chunkSeconds": request.chunkSeconds,
        "policies": policies.to_json(),
        "records": sorted(record_digests),
        "existingTargetIds": sorted(set(request.existingTargetIds)),
    }
    return Plan(
        run_id=request.runId,
        dataset=request.dataset,
        version_label=request.versionLabel,
        start_us=start_us,
        end_us=end_us,
        chunk_us=chunk_us,
        policies=policies,
        partitions=partitions_for(start_us, end_us, chunk_us),
        plan_hash=prefixed(sha256_hex(fast_jcs(document))),
    )
