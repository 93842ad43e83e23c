"""The engine's errors as HTTP answers, mirroring the CLI's exit statuses (CONTRACT section 3):

| engine                                 | CLI exit | HTTP                                                   |
|----------------------------------------|----------|--------------------------------------------------------|
| `InvalidInput(field, message)`         | 2        | 422 `{error: invalid_input, field, message}`           |
| `Blocked` (a gate)                     | 3        | 409, the gate document; `Pcbo-Message` says why        |
| `DatasetBusy` (the lease did not come) | 1        | 503 `{error: dataset_busy, message}`, `Retry-After`    |
| `CatalogLockBusy` (a catalog lock)     | 1        | 503 `{error: catalog_busy, message}`, `Retry-After`    |
| another `PcboError` with a document    | 1        | 500, the document (an execute that failed)             |
| anything else                          | 1        | 500 `{error: failed, message}` (one line, no secrets)  |
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from pcbo_dagster.catalog.database import CatalogLockBusy
from pcbo_dagster.core.errors import Blocked, InvalidInput, PcboError
from pcbo_dagster.engine.environment import DatasetBusy
from pcbo_dagster.io.redaction import is_store_error, one_line_error, scrub_text


def error_document(error: str, message: str, field: str | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {"error": error, "message": message}
    if field is not None:
        document["field"] = field
    return document


class ApiError(Exception):
    """An answer other than success, raised anywhere in a request's handling."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.document = error_document(error, message, field)
        self.headers = headers or {}
        super().__init__(message)

    def response(self) -> JSONResponse:
        return JSONResponse(self.document, status_code=self.status, headers=self.headers)


def invalid(field: str, message: str) -> ApiError:
    """422 naming the field, as the CLI's exit-2 message does."""
    return ApiError(422, "invalid_input", message, field)


def _header_text(text: str) -> str:
    """`text` as an HTTP header value (Latin-1 only, one line)."""
    return text.encode("latin-1", errors="replace").decode("latin-1").replace("\r", " ").replace("\n", " ")


def engine_error_response(exc: BaseException) -> JSONResponse:
    """The HTTP answer for an error the engine raised (module doc)."""
    if isinstance(exc, InvalidInput):
        return invalid(exc.field, exc.message).response()
    if isinstance(exc, Blocked):
        return JSONResponse(exc.document, status_code=409, headers={"Pcbo-Message": _header_text(str(exc))})
    if isinstance(exc, DatasetBusy):
        return ApiError(503, "dataset_busy", scrub_text(str(exc)), headers={"Retry-After": "5"}).response()
    if isinstance(exc, CatalogLockBusy):  # another session held it for all of PCBO_LEASE_WAIT_SECONDS
        return ApiError(503, "catalog_busy", scrub_text(str(exc)), headers={"Retry-After": "5"}).response()
    if isinstance(exc, PcboError):
        document = getattr(exc, "document", None)
        if isinstance(document, dict):
            return JSONResponse(
                document, status_code=500, headers={"Pcbo-Message": _header_text(scrub_text(str(exc)))}
            )
        return ApiError(500, "failed", scrub_text(str(exc))).response()
    if is_store_error(exc):
        return ApiError(500, "failed", one_line_error(exc)).response()
    return ApiError(500, "failed", f"internal error ({type(exc).__name__})").response()
