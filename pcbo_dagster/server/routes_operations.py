"""The reconciliation backend (the dashboard contract): the event stream, the audit page, commands,
registered services; and the admin status and the open health check."""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import parse_instant
from pcbo_dagster.core.request_model import NAME_PATTERN, parse_json_strict
from pcbo_dagster.server import models
from pcbo_dagster.server.auth import Principal, require, token_still_valid
from pcbo_dagster.server.broker import EventStreamResponse
from pcbo_dagster.server.commands import check_command_scope, command_principal
from pcbo_dagster.server.errors import ApiError, invalid
from pcbo_dagster.server.routes_backfill import BODY_ERRORS, ERRORS, read_body
from pcbo_dagster.server.status import admin_status, registered_services

router = APIRouter(tags=["operations"])
#: A filter's text: no control character (PostgreSQL refuses a NUL in any text parameter: 500 and a
#: dropped connection, not the 422 naming the parameter).
PLAIN_TEXT = r"^[^\x00-\x1f\x7f]*$"
#: How long a dropped SSE client has to take its last event before its connection is closed.
DROP_GRACE_SECONDS = 2.0


@router.get(
    "/healthz", summary="Liveness (the only open endpoint)", response_model=models.Health, tags=["health"]
)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/reconciliation/stream",
    summary="Server-Sent Events: reconciliation.update, command.status, run.status, run.progress, heartbeat",
    response_class=JSONResponse,
    responses={
        200: {
            "description": "an event stream (`text/event-stream`): `id:`, `event:`, one JSON `data:` "
            "line per event",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **ERRORS,
    },
)
async def stream(request: Request, principal: Annotated[Principal, Depends(require("read"))]) -> Any:
    state = request.app.state
    if state.shutting_down:
        raise ApiError(503, "shutting_down", "the server is shutting down")
    limit = state.config.streams_per_token
    if state.broker.streams_of(principal.token_id) >= limit:  # on the event loop: no race with subscribe
        raise ApiError(
            429,
            "too_many_streams",
            f"this token already has {limit} event streams open (PCBO_SSE_STREAMS_PER_TOKEN): close one",
            headers={"Retry-After": "5"},
        )
    subscriber = state.broker.subscribe(principal.datasets, token_still_valid(request), principal.token_id)
    return EventStreamResponse(state.broker, subscriber, state.config.heartbeat_seconds, DROP_GRACE_SECONDS)


def _instant_param(name: str, value: str | None) -> Any:
    if value is None:
        return None
    from datetime import UTC, datetime, timedelta

    try:
        micros = parse_instant(value)
    except (InvalidInput, ValueError) as exc:
        raise invalid(name, f"must be an instant like 2024-01-01T00:00:00Z ({exc})") from None
    if micros is None:
        raise invalid(name, "must be an instant like 2024-01-01T00:00:00Z")
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)


@router.get(
    "/reconciliation/audit",
    summary="The audit log, newest first: commands, audit events and discrepancies",
    response_model=models.AuditPage,
    responses=ERRORS,
)
def audit(
    request: Request,
    principal: Annotated[Principal, Depends(require("read"))],
    page: Annotated[int, Query(ge=1, le=10**9)] = 1,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    sortBy: Literal["timestamp", "actionType", "target", "source"] = "timestamp",  # noqa: N803
    sortOrder: Literal["asc", "desc"] = "desc",  # noqa: N803
    actionType: Annotated[str | None, Query(max_length=255, pattern=PLAIN_TEXT)] = None,  # noqa: N803
    target: Annotated[
        str | None,
        Query(max_length=1024, pattern=PLAIN_TEXT, description="exact, or a prefix ending at /"),
    ] = None,
    startDate: Annotated[
        str | None, Query(description="inclusive instant, e.g. 2024-01-01T00:00:00Z")
    ] = None,  # noqa: N803
    endDate: Annotated[str | None, Query(description="exclusive instant")] = None,  # noqa: N803
) -> dict[str, Any]:
    start, end = _instant_param("startDate", startDate), _instant_param("endDate", endDate)
    entries, total = request.app.state.catalog.audit_page(
        page=page,
        limit=limit,
        sort_by=sortBy,
        descending=sortOrder == "desc",
        action_type=actionType,
        target=target,
        start=start,
        end=end,
        datasets=principal.dataset_list,
    )
    return {
        "data": entries,
        "meta": {"page": page, "limit": limit, "total": total, "totalPages": math.ceil(total / limit)},
    }


COMMAND_BODY = {
    "requestBody": {
        "required": True,
        "description": "The command. Parsed strictly: duplicate keys, NaN and unknown fields are invalid "
        "input.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CommandRequest"}}},
    }
}


def command_request_schema() -> dict[str, Any]:
    """The command's JSON schema for the OpenAPI document's components."""
    return {"CommandRequest": models.CommandRequest.model_json_schema()}


def _command_request(raw: bytes) -> models.CommandRequest:
    """The command body parsed strictly and validated (422 naming the field)."""
    try:
        value = parse_json_strict(raw, "body").value
    except InvalidInput as exc:
        raise invalid(exc.field, exc.message) from None
    try:
        return models.CommandRequest.model_validate(value)
    except ValidationError as exc:  # the FastAPI handler names the field as for any parameter
        raise RequestValidationError(exc.errors(include_url=False)) from None


@router.post(
    "/commands/run",
    summary="Run a maintenance command (idempotent by commandId); phases on the event stream",
    response_model=models.CommandState,
    status_code=202,
    responses={
        200: {"model": models.CommandState, "description": "a known commandId: its current state"},
        **ERRORS,
        413: BODY_ERRORS[413],
        503: {"model": models.ErrorDocument, "description": "shutting down"},
    },
    openapi_extra=COMMAND_BODY,
)
async def run_command(
    request: Request, principal: Annotated[Principal, Depends(command_principal)]
) -> JSONResponse:
    # The token first (the dependency), then the body, bounded like every body (413 past the limit);
    # the scope is the action's (`prepare`), and a known command's (`check_command_scope`).
    body = await asyncio.to_thread(_command_request, await read_body(request))
    runner = request.app.state.commands
    existing = await asyncio.to_thread(runner.existing, body.commandId)
    if existing is None:
        command = await asyncio.to_thread(runner.prepare, principal, body.model_dump())
        state = runner.start(command)
        if state is not None:
            return JSONResponse(state, status_code=202)
        # Another request recorded that commandId since it was looked up: its command, not this one.
        existing = await asyncio.to_thread(runner.existing, body.commandId)
        assert existing is not None
    if not principal.may_touch(_command_dataset(request, existing)):  # as GET /commands/{id}
        raise ApiError(404, "not_found", f"no command {body.commandId!r}")
    check_command_scope(principal, existing)
    return JSONResponse(existing, status_code=200)


def _command_dataset(request: Request, state: dict[str, Any]) -> str | None:
    rows = request.app.state.catalog.command_phases(state["commandId"])
    return rows[0]["dataset"] if rows else None


@router.get(
    "/commands/{commandId}",
    summary="A command's current state",
    response_model=models.CommandState,
    responses={**ERRORS, 404: {"model": models.ErrorDocument}},
)
def command_status(
    request: Request,
    principal: Annotated[Principal, Depends(command_principal)],
    commandId: Annotated[str, Path(pattern=NAME_PATTERN)],  # noqa: N803 - as a command's is
) -> dict[str, Any]:
    state = request.app.state.commands.existing(commandId)
    if state is None or not principal.may_touch(_command_dataset(request, state)):
        raise ApiError(404, "not_found", f"no command {commandId!r}")
    check_command_scope(principal, state)
    return state


@router.get(
    "/services/registered",
    summary="Catalog, lake, audit backup and endpoint, Dagster, witnesses: health and last check",
    response_model=models.ServiceList,
    responses=ERRORS,
)
def services(request: Request, principal: Annotated[Principal, Depends(require("read"))]) -> dict[str, Any]:
    state = request.app.state
    return {"data": registered_services(state.config, state.catalog, state.lake, state.backup)}


@router.get(
    "/v1/admin/status",
    summary="Leases, runs in flight, freshness per dataset, undelivered audit events, latest checkpoint",
    response_model=models.AdminStatus,
    responses=ERRORS,
    tags=["admin"],
)
def status(request: Request, principal: Annotated[Principal, Depends(require("admin"))]) -> dict[str, Any]:
    state = request.app.state
    document = admin_status(
        state.config,
        state.catalog,
        state.backup,
        state.runs.in_flight(),
        state.reconciler.latest,
        principal.dataset_list,
    )
    document["eventStream"] = {
        "subscribers": state.broker.subscriber_count,
        "dropped": state.broker.dropped_total,
        "reconciliationPolls": state.reconciler.polls,
    }
    return document
