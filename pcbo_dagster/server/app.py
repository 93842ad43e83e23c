"""The application factory (`create_app`), its lifespan, the structured access log and `serve`.

One process serves one catalog: at start, API runs a previous process left queued or running are
marked `interrupted` (submit them again: the engine heals a crash and leaves committed partitions
unchanged; an `Idempotency-Key` they claimed is released, so the retry runs), and commands it left
so end in `error`, saying the server stopped. Shutdown (SIGINT/SIGTERM): new executes and commands
are refused (503), the event streams end (each client gets a last `dropped` event), in-flight
requests are answered, queued executes that have not started are marked interrupted, and running
executes are waited for (`PCBO_SERVER_SHUTDOWN_GRACE`); the worker threads are joined before the
process exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pcbo_dagster import __version__
from pcbo_dagster.audit.object_store_backup import open_backup
from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.core.errors import PcboError
from pcbo_dagster.io.redaction import scrub_text
from pcbo_dagster.lake.storage import LakeStorage
from pcbo_dagster.server import routes_backfill, routes_operations
from pcbo_dagster.server.auth import Principal, require
from pcbo_dagster.server.broker import EventBroker
from pcbo_dagster.server.commands import CommandRunner
from pcbo_dagster.server.config import ServerConfig
from pcbo_dagster.server.errors import ApiError, engine_error_response, invalid
from pcbo_dagster.server.reconciliation import Reconciler
from pcbo_dagster.server.runs import RunManager

access_log = logging.getLogger("pcbo.server.access")
log = logging.getLogger("pcbo.server")

#: A request's line and headers are read up to this many bytes (h11's limit as `serve` sets it, and
#: the one `http_protocol_with_read_deadline` enforces for httptools, which has none): past it, the
#: parser's plain-text 400 and the connection closed.
MAX_HEAD_BYTES = 64 * 1024


def _field_of(loc: Sequence[Any]) -> str:
    """A FastAPI validation error's location as the field a user typed (`limit`, `commandId`,
    `params`): the parameter or body path without its `query` / `path` / `body` prefix."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("query", "path", "header", "body", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "request"


async def _poll_forever(app: FastAPI) -> None:
    state = app.state
    while True:
        try:
            await asyncio.get_running_loop().run_in_executor(state.poll_executor, state.reconciler.poll)
        except Exception as exc:  # keep polling: a catalog that went away may come back
            log.warning(
                "reconciliation poll failed: %s", scrub_text(str(exc)).splitlines()[0] if str(exc) else exc
            )
        await asyncio.sleep(state.config.reconcile_seconds)


def begin_shutdown(app: FastAPI) -> None:
    """Refuse new work and end the event streams (called when the server is asked to stop, before it
    waits for open connections)."""
    state = app.state
    if state.shutting_down:
        return
    state.shutting_down = True
    state.runs.accepting = False
    state.commands.accepting = False
    state.broker.close_all("the server is shutting down")


def create_app(config: ServerConfig) -> FastAPI:
    """The FastAPI application on `config` (catalog migrated, lake and audit backup opened)."""
    from concurrent.futures import ThreadPoolExecutor

    settings = config.engine
    settings.home.mkdir(parents=True, exist_ok=True)
    catalog = CatalogStore(settings.catalog_url)
    catalog.migrate()
    lake = LakeStorage(settings.lake_url)
    # the durable copy: an object store every host shares (`audit_dir` then only caches it), or the
    # local directory, as every command opens it (`engine.environment`)
    backup = open_backup(settings.audit_location, settings.audit_dir)
    broker = EventBroker(config.sse_queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        broker.bind(asyncio.get_running_loop())
        stale = await asyncio.to_thread(
            catalog.interrupt_api_runs,
            "the server stopped while this execute was queued or running: submit the same request again",
        )
        if stale:
            log.warning("marked %d API run(s) interrupted: %s", len(stale), ", ".join(stale))
        released = await asyncio.to_thread(catalog.release_unanswered_idempotency_keys)
        if released:
            log.warning("released %d idempotency key(s) no answer was recorded for", released)
        ended = await asyncio.to_thread(app.state.commands.interrupt_unfinished)
        if ended:
            log.warning("ended %d command(s) left unfinished (error): %s", len(ended), ", ".join(ended))
        poller = asyncio.get_running_loop().create_task(_poll_forever(app))
        try:
            yield
        finally:
            begin_shutdown(app)
            poller.cancel()
            await app.state.commands.shutdown(config.shutdown_grace)
            still = await asyncio.to_thread(app.state.runs.shutdown, config.shutdown_grace)
            if still:
                log.warning("executes still running after the grace period (joined before exit): %s", still)
            app.state.poll_executor.shutdown(wait=False, cancel_futures=True)
            app.state.plan_executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="pcbo",
        version=__version__,
        description="Policy-constrained backfills: plan, dry-run and execute requests (CONTRACT's JSON), "
        "proofs, the reconciliation stream, the audit log and maintenance commands. Bearer tokens "
        "(`pcbo token create`) with scopes read, plan, execute, approve, admin.",
        lifespan=lifespan,
        openapi_url=None,  # served below, behind a token: only /healthz is open
        docs_url=None,
        redoc_url=None,
        # `/v1/plan/` is an unknown path (404), not a 307 to the `Host` header's host, tokenless
        redirect_slashes=False,
    )
    app.state.config = config
    app.state.catalog = catalog
    app.state.lake = lake
    app.state.backup = backup
    app.state.broker = broker
    app.state.shutting_down = False
    app.state.runs = RunManager(config, catalog, broker)
    app.state.commands = CommandRunner(config, catalog, broker)
    app.state.reconciler = Reconciler(catalog, lake, backup, broker)
    app.state.poll_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcbo-reconcile")
    #: Plans and dry-runs: their own bounded pool, never the event loop's default one (which reads
    #: request bodies, checks tokens and submits executes) however many are sent at once.
    app.state.plan_executor = ThreadPoolExecutor(
        max_workers=config.plan_workers, thread_name_prefix="pcbo-plan"
    )
    app.include_router(routes_backfill.router)
    app.include_router(routes_operations.router)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(PcboError)
    async def _engine_error(_request: Request, exc: PcboError) -> JSONResponse:
        return engine_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return invalid(_field_of(first.get("loc", ())), str(first.get("msg", "invalid"))).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body that is not JSON at all: invalid input like any other
            return invalid("body", str(exc.detail)).response()
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        document = {"error": kinds.get(exc.status_code, "http_error"), "message": str(exc.detail)}
        return JSONResponse(document, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.middleware("http")
    async def _access_log(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        status = 500
        try:
            try:
                response = await call_next(request)
            except Exception as exc:
                # Answered here, not by an `Exception` handler: Starlette raises the exception again
                # to the server after such a handler's answer, and uvicorn logs its whole traceback,
                # its text unscrubbed, and drops the kept-alive connection.
                text = " ".join(scrub_text(str(exc)).split())[:500]  # one line: none forged
                log.error("unexpected %s: %s", type(exc).__name__, text)
                response = engine_error_response(exc)
            status = response.status_code
            response.headers["X-Request-Id"] = request_id
            return response
        finally:
            principal = getattr(request.state, "principal", None)
            access_log.info(
                json.dumps(
                    {
                        "requestId": request_id,
                        "method": request.method,
                        "path": request.url.path,
                        "queryParams": sorted(request.query_params.keys()),
                        "status": status,
                        "durationMs": round((time.perf_counter() - started) * 1000, 3),
                        "subject": None if principal is None else principal.subject,
                        "tokenId": None if principal is None else principal.token_id,
                        "client": request.client.host if request.client else None,
                    },
                    separators=(",", ":"),
                )
            )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            schemas.update(routes_backfill.backfill_request_schema())
            schemas.update(routes_operations.command_request_schema())
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                if path != "/healthz":
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_document(_principal: Annotated[Principal, Depends(require("read"))]) -> JSONResponse:
        return JSONResponse(app.openapi())

    return app


def http_protocol_with_read_deadline(
    seconds: float, max_head_bytes: int = MAX_HEAD_BYTES
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11, as uvicorn's `auto` chooses) that
    closes a connection whose request headers are not whole `seconds` after the first byte of the
    request (the connection's opening, for its first): uvicorn has no such deadline, so a client
    dripping its headers held a connection slot, unauthenticated, for as long as it liked. The
    request's body has its own deadline (`routes_backfill.read_body`). A request whose line and
    headers are not whole within `max_head_bytes` is answered the parser's plain-text 400 and closed:
    httptools has no such limit, and its parser, concatenating an endless header chunk by chunk on
    the event loop, held up every other request for as long as one client kept sending. An answer
    of which the client takes nothing for `seconds` (the transport's buffer past its high-water mark
    and not smaller: the client reads nothing) aborts the connection: uvicorn waited for ever for a client
    that stopped reading, which held the answer's stream (a dry-run's decision spill) and a
    connection slot as long as it liked; the stream then ends as for a client that left."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools absent: uvicorn's h11 protocol
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class ReadDeadline(Base):
        _headers_due: asyncio.TimerHandle | None = None
        #: Bytes received since the request began while its headers were not yet whole.
        _head_bytes = 0

        def _wait_for_headers(self) -> None:
            if self._headers_due is None:
                self._head_bytes = 0
                self._headers_due = self.loop.call_later(seconds, self._headers_late)

        def _headers_came(self) -> None:
            self._head_bytes = 0
            if self._headers_due is not None:
                self._headers_due.cancel()
                self._headers_due = None

        def _headers_late(self) -> None:
            self._headers_due = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._wait_for_headers()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:  # these bytes begin a request
                self._wait_for_headers()
                self._head_bytes += len(data)
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:  # its headers are whole
                self._headers_came()
            elif self._head_bytes > max_head_bytes and not self.transport.is_closing():
                self._headers_came()
                self.send_400_response("Invalid HTTP request received.")

        _write_due: asyncio.TimerHandle | None = None
        #: The answer's bytes the client had not taken when last looked at (writing paused).
        _unwritten = 0

        def _not_taken(self) -> int:
            """The bytes written that the client's host has not acknowledged: the transport's
            buffer and the socket's send queue (Linux's SIOCOUTQ; elsewhere the buffer alone). The
            kernel's buffers hold what a client took before it stopped reading, so only both say
            whether a client that reads slowly has taken some."""
            size = int(self.transport.get_write_buffer_size())
            sock = self.transport.get_extra_info("socket")
            try:
                import fcntl
                import termios

                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                size += struct.unpack("i", queued)[0]
            except (ImportError, AttributeError, OSError, ValueError):
                pass
            return size

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_due is None:
                self._unwritten = self._not_taken()
                self._write_due = self.loop.call_later(seconds, self._write_late)

        def resume_writing(self) -> None:
            self._written()
            super().resume_writing()

        def _written(self) -> None:
            if self._write_due is not None:
                self._write_due.cancel()
                self._write_due = None

        def _write_late(self) -> None:
            self._write_due = None
            unwritten = self._not_taken()
            if unwritten < self._unwritten:  # the client took some: slow, but reading
                self._unwritten = unwritten
                self._write_due = self.loop.call_later(seconds, self._write_late)
                return
            self.transport.abort()  # (close() would wait to flush what the client never reads)

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_came()
            self._written()
            super().connection_lost(exc)

    return ReadDeadline


def serve(config: ServerConfig, host: str, port: int, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM (graceful shutdown, module doc)."""
    import uvicorn

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(message)s")
    app = create_app(config)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            begin_shutdown(app)
            await super().shutdown(sockets)

    uvicorn_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **uvicorn_options(config))
    Server(uvicorn_config).run()


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """uvicorn's settings for `config` (`serve`'s, and the tests' in-process server's): its
    connection limits, deadlines and HTTP protocol."""
    return {
        "access_log": False,  # ours is structured and never shows a query string or a header
        "timeout_graceful_shutdown": int(config.shutdown_grace),
        "timeout_keep_alive": max(1, round(config.keep_alive_seconds)),
        "limit_concurrency": config.max_connections,  # past it: 503 at once
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "http": http_protocol_with_read_deadline(config.read_seconds),
    }
