"""Bearer tokens, fail closed: no token or an unknown, revoked or expired one is 401; a token without
the scope an endpoint needs, or limited to other datasets, is 403. Only `/healthz` is open.

Scopes: `read` (listings, proofs, runs, the stream, the audit page, services, any command's state),
`plan` (plan, dry-run), `execute` (execute; the retry-partitions and rollback commands), `approve`
(rollout pause, resume and cancel), `admin` (everything, including the admin status, verify --repair
and gc). A command needs its action's scope only: `read` is not asked of an approver's pause. A token
limited to datasets reads and writes only those: listings are filtered, and anything about every
dataset (gc, verify, the admin status) needs an unlimited token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi import Request

from pcbo_dagster.catalog.schema import TOKEN_SCOPES
from pcbo_dagster.server.errors import ApiError

SCOPES = TOKEN_SCOPES


@dataclass(frozen=True)
class Principal:
    """Who is asking: the token's id and subject (the actor of every write), scopes and datasets."""

    token_id: str
    subject: str
    scopes: frozenset[str]
    #: The datasets the token may touch; None: every dataset.
    datasets: frozenset[str] | None

    def has(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def may_touch(self, dataset: str | None) -> bool:
        """Whether the token reaches `dataset` (None: something about every dataset)."""
        if self.datasets is None:
            return True
        return dataset is not None and dataset in self.datasets

    @property
    def dataset_list(self) -> Sequence[str] | None:
        return None if self.datasets is None else sorted(self.datasets)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="pcbo"'})


def _secret(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise unauthorized("the Authorization header must be 'Bearer <token>'")
    return secret


def token_still_valid(request: Request) -> Callable[[], bool]:
    """Whether the request's token still holds (known, not revoked, not expired), asked again later:
    what an answer that outlives its request (the event stream) checks as it goes on."""
    catalog, secret = request.app.state.catalog, _secret(request)
    return lambda: catalog.token_for_secret(secret) is not None


def principal_of(request: Request) -> Principal:
    """The token of the request's `Authorization: Bearer ...` header (checked against the catalog
    on every request, so a revoked token stops working at once)."""
    secret = _secret(request)
    token = request.app.state.catalog.token_for_secret(secret)
    if token is None:
        raise unauthorized("unknown, revoked or expired token")
    datasets = token["datasets"]
    return Principal(
        token["token_id"],
        token["subject"],
        frozenset(token["scopes"]),
        None if datasets is None else frozenset(datasets),
    )


def authenticated(request: Request) -> Principal:
    """A FastAPI dependency: the request's principal, whatever its scopes (an endpoint whose scope
    depends on what is asked checks it itself: the commands, per action)."""
    principal = principal_of(request)
    request.state.principal = principal
    return principal


def require(scope: str) -> Callable[[Request], Principal]:
    """A FastAPI dependency: the request's principal, which must hold `scope` (or admin)."""

    def dependency(request: Request) -> Principal:
        principal = principal_of(request)
        if not principal.has(scope):
            raise ApiError(403, "forbidden", f"this token lacks the {scope!r} scope")
        request.state.principal = principal
        return principal

    dependency.__name__ = f"require_{scope}"
    return dependency


def check_dataset(principal: Principal, dataset: str | None) -> None:
    """403 unless the token reaches `dataset` (None: every dataset)."""
    if not principal.may_touch(dataset):
        what = f"dataset {dataset!r}" if dataset is not None else "every dataset"
        raise ApiError(403, "forbidden", f"this token is not allowed to touch {what}")
