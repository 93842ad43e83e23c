"""The pydantic models the OpenAPI document is made of. The engine's documents (plan, dry-run,
execute, gate, proofs) are CONTRACT's and are sent as the engine makes them: their models name the
fields always present and allow the rest."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pcbo_dagster.core.request_model import NAME_PATTERN


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDocument(BaseModel):
    error: str = Field(
        description="what kind of error: invalid_input, unauthorized, forbidden, not_found, ..."
    )
    message: str
    field: str | None = Field(None, description="the request field, header or parameter at fault")


class PartitionWindow(_Open):
    index: int
    key: str
    start: Any
    end: Any


class PlanDocument(_Open):
    runId: str
    dataset: str
    versionLabel: str
    planHash: str
    partitions: list[PartitionWindow]


class DryRunDocument(_Open):
    runId: str
    dataset: str
    versionLabel: str
    planHash: str
    decisionHash: str
    partitions: list[dict[str, Any]]
    unplaced: list[dict[str, Any]]
    totals: dict[str, Any]


class ExecuteDocument(_Open):
    status: str
    runId: str
    dataset: str
    versionLabel: str
    planHash: str
    decisionHash: str
    partitions: list[dict[str, Any]]
    reconciliation: dict[str, Any]
    totals: dict[str, Any]


class GateDocument(_Open):
    status: Literal["blocked"]
    gate: str
    runId: str
    planHash: str
    decisionHash: str


class RunAccepted(BaseModel):
    runId: str
    status: str
    statusUrl: str


class RunStatus(BaseModel):
    runId: str
    status: str = Field(description="queued, running, done, blocked, invalid, failed or interrupted")
    actor: str
    dataset: str
    versionLabel: str
    dagsterRunId: str | None
    submittedAt: str
    finishedAt: str | None
    httpStatus: int | None = Field(description="the status the synchronous answer would have had")
    document: dict[str, Any] | None = Field(description="the answer's document once finished")


class DatasetSummary(BaseModel):
    dataset: str
    versionLabel: str
    partitions: int
    records: int
    newestPartition: str | None
    firstSeenAt: str


class DatasetList(BaseModel):
    data: list[DatasetSummary]


class PartitionVersion(BaseModel):
    key: str
    version: int
    status: str
    runId: str
    recordCount: int
    merkleRoot: str
    manifestChecksum: str
    eventHash: str | None
    committedAt: str
    files: list[dict[str, Any]]


class PartitionList(BaseModel):
    dataset: str
    versionLabel: str
    partitions: list[PartitionVersion]


class ProofDocument(_Open):
    kind: str
    dataset: str
    versionLabel: str
    partition: str


class AuditEntry(BaseModel):
    id: str
    source: Literal["command", "audit_event", "discrepancy"]
    actionType: str
    target: str
    timestamp: str
    actor: str | None
    details: dict[str, Any]


class PageMeta(BaseModel):
    page: int
    limit: int
    total: int
    totalPages: int


class AuditPage(BaseModel):
    data: list[AuditEntry]
    meta: PageMeta


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    commandId: str = Field(pattern=NAME_PATTERN, description="makes the call idempotent")
    action: Literal[
        "retry-partitions", "rollback", "pause-rollout", "resume-rollout", "cancel-rollout", "verify", "gc"
    ]
    target: str = Field(min_length=1, max_length=255)
    params: dict[str, Any] = Field(default_factory=dict)


class CommandPhase(BaseModel):
    phase: str
    at: str


class CommandState(BaseModel):
    commandId: str
    action: str
    target: str
    params: dict[str, Any]
    actor: str
    phase: Literal["queued", "running", "success", "error", "timeout"]
    phases: list[CommandPhase]
    outcome: Any
    beforeState: Any
    afterState: Any
    logs: list[str]


class Service(_Open):
    id: str
    type: str
    health: str
    lastCheck: str


class ServiceList(BaseModel):
    data: list[Service]


class AdminStatus(_Open):
    leases: dict[str, Any]
    runsInFlight: dict[str, Any]
    datasets: list[dict[str, Any]]
    latestCheckpoint: dict[str, Any]


class Health(BaseModel):
    status: Literal["ok"]
