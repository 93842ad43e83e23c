"""`/v1`: plan, dry-run and execute of a request (CONTRACT's request JSON and documents), runs,
datasets, partitions and proofs."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Generator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.json_documents import streamed_text
from pcbo_dagster.core.request_model import NAME_PATTERN, BackfillRequest
from pcbo_dagster.engine.request_loading import ValidatedRequest, validate_request_bytes
from pcbo_dagster.server import models
from pcbo_dagster.server.auth import Principal, check_dataset, require
from pcbo_dagster.server.errors import ApiError, engine_error_response, invalid
from pcbo_dagster.server.runs import Answer, request_digest
from pcbo_dagster.server.status import instant

router = APIRouter(prefix="/v1", tags=["backfill"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": models.ErrorDocument, "description": "no token, or an unknown, revoked or expired one"},
    403: {"model": models.ErrorDocument, "description": "the token lacks the scope or the dataset"},
    422: {"model": models.ErrorDocument, "description": "invalid input; `field` names it (the CLI's exit 2)"},
}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    413: {"model": models.ErrorDocument, "description": "the body is larger than PCBO_SERVER_MAX_BODY_BYTES"},
    504: {"model": models.ErrorDocument, "description": "no answer within PCBO_SERVER_REQUEST_TIMEOUT"},
}
PROOF_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    500: {
        "model": models.ErrorDocument,
        "description": "the partition's files are unreadable or not what its audit chain committed",
    },
}
REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "The backfill request (CONTRACT section 1). Parsed strictly: duplicate keys, NaN "
        "and unknown fields are invalid input.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BackfillRequest"}}},
    }
}
NameParam = Annotated[str, Path(pattern=NAME_PATTERN, description="a dataset name")]
VersionLabel = Annotated[str, Query(pattern=NAME_PATTERN, description="the dataset's version label")]


async def read_body(request: Request) -> bytes:
    """The request body, refused (413) past the server's limit before it is all read, and (408) when
    it pauses longer than `PCBO_SERVER_READ_SECONDS` between two chunks."""
    limit = request.app.state.config.max_body_bytes
    pause = request.app.state.config.read_seconds
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"the body is {declared} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    stream = request.stream()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), pause)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ApiError(
                    408, "request_timeout", f"the body paused for more than {pause:g} s; send it whole"
                ) from None
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"the body is over {limit} bytes, this server's limit")
            chunks.append(chunk)
    except ClientDisconnect:  # the client's doing, not a server error (no one is there to answer)
        raise ApiError(400, "client_disconnected", "the client left before its body was whole") from None
    finally:
        await stream.aclose()
    return b"".join(chunks)


def peek_request(raw: bytes, max_partitions: int) -> ValidatedRequest:
    """The request parsed and validated (422 naming the field), within the server's partition limit
    (passed on to the engine, which does not parse it again)."""
    try:
        validated = validate_request_bytes(raw)
    except InvalidInput as exc:
        raise invalid(exc.field, exc.message) from None
    request = validated.request
    if request.ledgerRange is not None:
        span, chunk, field = (
            request.ledgerRange.end - request.ledgerRange.first,
            request.ledgerRange.partitionSize,
            "ledgerRange.partitionSize",
        )
    else:
        span, chunk, field = request.end_us - request.start_us, request.chunk_us, "chunkSeconds"
    count = -(-span // chunk)
    if count > max_partitions:
        raise invalid(
            field, f"the window would make {count} partitions; this server's limit is {max_partitions}"
        )
    return validated


async def _in_thread(request: Request, func: Any, *args: Any) -> Any:
    """`func(*args)` in a thread of the plan and dry-run pool (`PCBO_SERVER_PLAN_WORKERS`), answered
    within the request timeout (504 past it, the time waiting for a thread included)."""
    timeout = request.app.state.config.request_timeout
    pool = request.app.state.plan_executor
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(pool, func, *args), timeout)
    except TimeoutError:
        raise ApiError(
            504, "timeout", f"no answer within {timeout:g} s (PCBO_SERVER_REQUEST_TIMEOUT)"
        ) from None


async def _checked_request(request: Request, principal: Principal) -> tuple[bytes, ValidatedRequest]:
    raw = await read_body(request)
    validated = await asyncio.to_thread(peek_request, raw, request.app.state.config.max_partitions)
    check_dataset(principal, validated.request.dataset)
    return raw, validated


@router.post(
    "/plan",
    summary="The partitions of a request and its plan hash (pcbo plan)",
    response_model=models.PlanDocument,
    responses=BODY_ERRORS,
    openapi_extra=REQUEST_BODY,
)
async def plan(request: Request, principal: Annotated[Principal, Depends(require("plan"))]) -> JSONResponse:
    from pcbo_dagster.engine.backfill_commands import plan_document

    _, validated = await _checked_request(request, principal)
    config = request.app.state.config
    try:
        document = await _in_thread(request, plan_document, validated, config.sources_dir, config.sources)
    except ApiError:
        raise
    except Exception as exc:
        return engine_error_response(exc)
    return JSONResponse(document)


def _dry_run_pieces(evaluated: Any) -> Generator[bytes, None, None]:
    """The dry-run document as it is written (a streamed source's partitions read from its spill),
    in pieces of about 64 KiB; the evaluation is closed at the end."""
    try:
        buffer: list[str] = []
        size = 0
        for piece in streamed_text(evaluated.decisions.to_json(lazy=True)):
            buffer.append(piece)
            size += len(piece)
            if size >= 65536:
                yield "".join(buffer).encode("utf-8")
                buffer, size = [], 0
        buffer.append("\n")
        yield "".join(buffer).encode("utf-8")
    finally:
        evaluated.close()


class _DryRunStream(StreamingResponse):
    """The dry-run document streamed from `_dry_run_pieces` (each piece made in a thread), the
    evaluation closed when the stream ends however it ends. A client that leaves mid-way has the
    stream cancelled with its generator suspended, which nothing closed: the decision spill (a file as
    large as the source's decisions, a SQLite connection and its page cache) stayed for as long as the
    server ran. Closing waits for a piece being made (one lock), never runs beside it."""

    def __init__(self, evaluated: Any) -> None:
        self._pieces = _dry_run_pieces(evaluated)
        self._lock = threading.Lock()
        super().__init__(self._next_pieces(), media_type="application/json")

    def _next_pieces(self) -> Generator[bytes, None, None]:
        while True:
            with self._lock:
                piece = next(self._pieces, None)
            if piece is None:
                return
            yield piece

    def _close(self) -> None:
        with self._lock:
            self._pieces.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        import anyio

        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # a stream cancelled still closes its evaluation
                await anyio.to_thread.run_sync(self._close)


@router.post(
    "/dry-run",
    summary="Every decision of a request, nothing written (pcbo dry-run)",
    response_model=models.DryRunDocument,
    responses=BODY_ERRORS,
    openapi_extra=REQUEST_BODY,
)
async def dry_run(request: Request, principal: Annotated[Principal, Depends(require("plan"))]) -> Any:
    from pcbo_dagster.engine.backfill_commands import evaluate_request

    _, validated = await _checked_request(request, principal)
    config = request.app.state.config
    try:
        # The server's settings: its audit chain (read and verified, nothing written) names the Iceberg
        # table an earlier run declared the dataset version publishes to, whose columns execute checks.
        evaluated = await _in_thread(
            request, evaluate_request, validated, config.sources_dir, config.sources, config.engine
        )
    except ApiError:
        raise
    except Exception as exc:
        return engine_error_response(exc)
    return _DryRunStream(evaluated)


def _answer(answer: Answer) -> JSONResponse:
    return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)


def _accepted(run_id: str, status: str) -> Answer:
    url = f"/v1/runs/{run_id}"
    return Answer(202, {"runId": run_id, "status": status, "statusUrl": url}, {"Location": url})


@router.post(
    "/execute",
    summary="Execute a request: write, prove, audit, reconcile (pcbo execute)",
    response_model=models.ExecuteDocument,
    responses={
        **BODY_ERRORS,
        202: {
            "model": models.RunAccepted,
            "description": "`Prefer: respond-async` (or a long run): poll statusUrl",
        },
        409: {
            "model": models.GateDocument | models.ErrorDocument,
            "description": "blocked by a gate (the gate document: breaches or the hash mismatch; nothing "
            "written), or a run of that runId in progress, or an Idempotency-Key still being answered",
        },
        500: {"model": models.ExecuteDocument | models.ErrorDocument, "description": "the execute failed"},
        503: {
            "model": models.ErrorDocument,
            "description": "the dataset's lease did not come, or shutting down",
        },
    },
    openapi_extra=REQUEST_BODY,
)
async def execute(
    request: Request,
    principal: Annotated[Principal, Depends(require("execute"))],
    prefer: Annotated[str | None, Header(description="`respond-async`: answer 202 at once")] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=255,
            description="a retry with the same key and body gets the first answer",
        ),
    ] = None,
    dagster: Annotated[
        bool, Query(description="run it as a Dagster `pcbo_request` run (PCBO_DAGSTER_URL must be set)")
    ] = False,
) -> JSONResponse:
    state = request.app.state
    raw, validated = await _checked_request(request, principal)
    if dagster and not state.config.dagster_url:
        raise invalid("dagster", "no Dagster instance is configured (PCBO_DAGSTER_URL)")
    respond_async = prefer is not None and "respond-async" in [p.strip().lower() for p in prefer.split(",")]
    if idempotency_key is not None:
        if not idempotency_key.strip() or not idempotency_key.isprintable():
            raise invalid("Idempotency-Key", "must be printable text")
        first = await asyncio.to_thread(
            state.catalog.claim_idempotency_key, principal.subject, idempotency_key, request_digest(raw)
        )
        if first is not None:
            if first["request_hash"] != request_digest(raw):
                raise invalid("Idempotency-Key", "was used before with a different request")
            if first["http_status"] is None:
                raise ApiError(
                    409, "idempotency_in_progress", "the first request with this key is still being answered"
                )
            return _answer(Answer.from_json(first["response"]))
    try:
        answer = await _run_execute(request, principal, raw, validated, respond_async, dagster)
    except ApiError as exc:
        if idempotency_key is not None:
            await asyncio.to_thread(state.catalog.release_idempotency_key, principal.subject, idempotency_key)
        raise exc
    except BaseException:
        if idempotency_key is not None:
            await asyncio.to_thread(state.catalog.release_idempotency_key, principal.subject, idempotency_key)
        raise
    if idempotency_key is not None:
        await asyncio.to_thread(
            state.catalog.answer_idempotency_key,
            principal.subject,
            idempotency_key,
            answer.status,
            answer.to_json(),
        )
    return _answer(answer)


async def _run_execute(
    request: Request,
    principal: Principal,
    raw: bytes,
    validated: ValidatedRequest,
    respond_async: bool,
    dagster: bool,
) -> Answer:
    state = request.app.state
    peeked = validated.request
    future = await asyncio.to_thread(
        state.runs.submit,
        run_id=peeked.runId,
        dataset=peeked.dataset,
        version_label=peeked.versionLabel,
        raw=raw,
        validated=validated,
        actor=principal.subject,
        dagster=dagster,
    )
    if respond_async:
        return _accepted(peeked.runId, "queued")
    try:
        return await asyncio.wait_for(
            asyncio.shield(asyncio.wrap_future(future)), state.config.request_timeout
        )
    except TimeoutError:
        return _accepted(peeked.runId, "running")


@router.get(
    "/runs/{runId}",
    summary="An execute's status and, when finished, its answer",
    response_model=models.RunStatus,
    responses={**ERRORS, 404: {"model": models.ErrorDocument}},
)
def run_status(
    request: Request,
    principal: Annotated[Principal, Depends(require("read"))],
    runId: Annotated[str, Path(pattern=NAME_PATTERN)],  # noqa: N803 - the API's name
) -> dict[str, Any]:
    row = request.app.state.catalog.get_api_run(runId)
    if row is None or not principal.may_touch(row["dataset"]):
        raise ApiError(404, "not_found", f"no run {runId!r} submitted through this API")
    return {
        "runId": row["run_id"],
        "status": row["status"],
        "actor": row["actor"],
        "dataset": row["dataset"],
        "versionLabel": row["version_label"],
        "dagsterRunId": row["dagster_run_id"],
        "submittedAt": instant(row["submitted_at"]),
        "finishedAt": instant(row["finished_at"]),
        "httpStatus": row["http_status"],
        "document": None if row["document"] is None else row["document"].get("body"),
    }


@router.get(
    "/datasets",
    summary="The datasets of the catalog (those the token may read)",
    response_model=models.DatasetList,
    responses=ERRORS,
)
def datasets(request: Request, principal: Annotated[Principal, Depends(require("read"))]) -> dict[str, Any]:
    catalog = request.app.state.catalog
    versions = catalog.partition_versions()
    data = []
    for row in catalog.datasets():
        if not principal.may_touch(row["dataset"]):
            continue
        committed = [
            v
            for v in versions
            if v["dataset"] == row["dataset"]
            and v["version_label"] == row["version_label"]
            and v["status"] == "committed"
        ]
        data.append(
            {
                "dataset": row["dataset"],
                "versionLabel": row["version_label"],
                "partitions": len(committed),
                "records": sum(int(v["record_count"]) for v in committed),
                "newestPartition": max((v["partition_key"] for v in committed), default=None),
                "firstSeenAt": instant(row["first_seen_at"]),
            }
        )
    return {"data": data}


def _registered(request: Request, dataset: str, version_label: str) -> None:
    known = {(r["dataset"], r["version_label"]) for r in request.app.state.catalog.datasets()}
    if (dataset, version_label) not in known:
        raise ApiError(404, "not_found", f"no dataset {dataset}/{version_label} in the catalog")


@router.get(
    "/datasets/{dataset}/partitions",
    summary="A dataset's partition versions: roots, counts, files",
    response_model=models.PartitionList,
    responses={**ERRORS, 404: {"model": models.ErrorDocument}},
)
def partitions(
    request: Request,
    principal: Annotated[Principal, Depends(require("read"))],
    dataset: NameParam,
    versionLabel: VersionLabel = "v1",  # noqa: N803 - the API's name
    all_versions: Annotated[
        bool, Query(alias="allVersions", description="also superseded and rolled back")
    ] = False,
) -> dict[str, Any]:
    check_dataset(principal, dataset)
    _registered(request, dataset, versionLabel)
    rows = request.app.state.catalog.partition_versions(dataset, versionLabel)
    return {
        "dataset": dataset,
        "versionLabel": versionLabel,
        "partitions": [
            {
                "key": r["partition_key"],
                "version": r["version"],
                "status": r["status"],
                "runId": r["run_id"],
                "recordCount": r["record_count"],
                "merkleRoot": r["merkle_root"],
                "manifestChecksum": r["manifest_checksum"],
                "eventHash": r["event_hash"],
                "committedAt": instant(r["committed_at"]),
                "files": r["files"],
            }
            for r in rows
            if all_versions or r["status"] == "committed"
        ],
    }


def _partition_key(key: str) -> str:
    from pcbo_dagster.core.partition_keys import PartitionKeyError, validate_partition_key

    try:
        return validate_partition_key(key)
    except PartitionKeyError as exc:
        raise invalid("key", str(exc)) from None


def _proof_sources(request: Request) -> Any:
    """The lake, audit backup and catalog chain heads a proof is made from (`engine/proofs.py`)."""
    from pcbo_dagster.engine.proofs import ProofSources
    from pcbo_dagster.engine.transparency_log import other_history_of, signing_key_of

    state = request.app.state
    key = signing_key_of(state.config.engine)  # (an event it should have signed and did not: no proof)
    return ProofSources(
        state.lake,
        state.backup,
        state.catalog.chain_heads(),
        other_history_of(state.catalog, state.lake, key),
    )


def _proof(func: Any, *args: Any) -> Any:
    try:
        return JSONResponse(func(*args))
    except InvalidInput as exc:
        field = {"partition": "key", "fromVersion": "from", "toVersion": "to"}.get(exc.field, exc.field)
        raise invalid(field, exc.message) from None


@router.get(
    "/datasets/{dataset}/partitions/{key}/proof",
    summary="RFC 6962 inclusion proof of an id in a partition's current version (pcbo proof --id)",
    response_model=models.ProofDocument,
    responses=PROOF_ERRORS,
)
def inclusion_proof(
    request: Request,
    principal: Annotated[Principal, Depends(require("read"))],
    dataset: NameParam,
    key: Annotated[str, Path(description="the partition key, e.g. 20240101T000000Z")],
    id: Annotated[str, Query(min_length=1, description="the record id to prove")],  # noqa: A002
    versionLabel: VersionLabel = "v1",  # noqa: N803 - the API's name
) -> Any:
    from pcbo_dagster.engine import proofs

    check_dataset(principal, dataset)
    return _proof(proofs.inclusion, _proof_sources(request), dataset, versionLabel, _partition_key(key), id)


@router.get(
    "/datasets/{dataset}/consistency",
    summary="RFC 6962 consistency proof between two versions of a partition (pcbo proof --from-version)",
    response_model=models.ProofDocument,
    responses=PROOF_ERRORS,
)
def consistency_proof(
    request: Request,
    principal: Annotated[Principal, Depends(require("read"))],
    dataset: NameParam,
    partition: Annotated[str, Query(description="the partition key")],
    from_version: Annotated[int, Query(alias="from", ge=1, le=2**31, description="the older version")],
    to_version: Annotated[int, Query(alias="to", ge=1, le=2**31, description="the newer version")],
    versionLabel: VersionLabel = "v1",  # noqa: N803 - the API's name
) -> Any:
    from pcbo_dagster.engine import proofs

    check_dataset(principal, dataset)
    key = _partition_key(partition)
    if from_version >= to_version:
        raise invalid("from", "must be an older version than to")
    return _proof(
        proofs.consistency, _proof_sources(request), dataset, versionLabel, key, from_version, to_version
    )


def backfill_request_schema() -> dict[str, Any]:
    """The request's JSON schema for the OpenAPI document (its $defs as component schemas)."""
    schema = BackfillRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return {"BackfillRequest": json.loads(json.dumps(schema)), **defs}
