"""The server's settings: the engine's (`engine.settings`, the same flags and variables as the CLI)
plus what only a server has. Every variable is read once, at start, with errors naming it.

| setting                      | variable                         | default                         |
|------------------------------|----------------------------------|---------------------------------|
| sources directory            | `PCBO_SOURCES_DIR`               | `$PCBO_HOME` (its stores refused)|
| largest request body         | `PCBO_SERVER_MAX_BODY_BYTES`     | 67,108,864 (64 MiB)             |
| most partitions a request    | `PCBO_SERVER_MAX_PARTITIONS`     | 100,000 (the engine's limit)    |
| synchronous answer within    | `PCBO_SERVER_REQUEST_TIMEOUT`    | 300 s (an execute then: 202)    |
| executes at once             | `PCBO_SERVER_EXECUTE_WORKERS`    | 2                               |
| plans and dry-runs at once   | `PCBO_SERVER_PLAN_WORKERS`       | 4                               |
| connections at once          | `PCBO_SERVER_MAX_CONNECTIONS`    | 512 (more: 503)                 |
| idle keep-alive connection   | `PCBO_SERVER_KEEPALIVE_SECONDS`  | 5 s                             |
| headers whole, body's pauses | `PCBO_SERVER_READ_SECONDS`       | 30 s (then closed; a body: 408) |
| an answer's stalls           | `PCBO_SERVER_READ_SECONDS`       | 30 s (then aborted)             |
| commands: default time limit | `PCBO_SERVER_COMMAND_TIMEOUT`    | 600 s                           |
| reconciliation poll          | `PCBO_RECONCILE_SECONDS`         | 30 s                            |
| SSE heartbeat                | `PCBO_SSE_HEARTBEAT_SECONDS`     | 15 s                            |
| SSE events queued per client | `PCBO_SSE_QUEUE_SIZE`            | 256                             |
| SSE streams open per token   | `PCBO_SSE_STREAMS_PER_TOKEN`     | 8 (more: 429)                   |
| shutdown grace for executes  | `PCBO_SERVER_SHUTDOWN_GRACE`     | 600 s                           |
| Dagster webserver            | `PCBO_DAGSTER_URL`               | none                            |
| datasets config              | `PCBO_DATASETS_CONFIG`           | the packaged example            |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.request_model import MAX_PARTITIONS
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.io.env_vars import plain_path, positive_int, positive_number
from pcbo_dagster.sources.local_files import SourcesDirectory


def _dagster_url(text: str | None) -> str | None:
    """`PCBO_DAGSTER_URL` when the remote client can use it (`Webserver.parse`: an http(s) URL with a
    host and a valid port, no credentials), else invalid input naming the variable: found when the
    server starts, not at each `?dagster=true` execute."""
    from pcbo_dagster.dagster_defs.remote import Webserver  # here: the Dagster layer's package

    url = plain_path("PCBO_DAGSTER_URL", text)
    if url is not None:
        try:
            Webserver.parse(url)
        except InvalidInput as exc:
            raise InvalidInput("PCBO_DAGSTER_URL", exc.message) from None
    return url


@dataclass(frozen=True)
class ServerConfig:
    engine: Settings
    sources_dir: Path
    #: pcbo's own stores (`Settings.own_paths`), never read as a source though in `sources_dir`.
    own_paths: tuple[Path, ...] = ()
    max_body_bytes: int = 64 * 1024 * 1024
    max_partitions: int = MAX_PARTITIONS
    request_timeout: float = 300.0
    execute_workers: int = 2
    plan_workers: int = 4
    max_connections: int = 512
    keep_alive_seconds: float = 5.0
    #: A request's headers must be whole this long after its first byte (the connection's, for the
    #: first), and its body may pause no longer between two chunks, nor its answer stay unwritten
    #: (the client reading nothing): a client that drips them, or stops reading, would hold its
    #: connection slot for as long as it liked.
    read_seconds: float = 30.0
    command_timeout: float = 600.0
    reconcile_seconds: float = 30.0
    heartbeat_seconds: float = 15.0
    sse_queue_size: int = 256
    streams_per_token: int = 8
    shutdown_grace: float = 600.0
    dagster_url: str | None = None
    dagster_timeout: float = 600.0
    #: Extra keyword arguments for tests (a clock); never read from the environment.
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_environment(cls, engine: Settings, environ: Mapping[str, str] | None = None) -> ServerConfig:
        env = os.environ if environ is None else environ
        sources = plain_path("PCBO_SOURCES_DIR", env.get("PCBO_SOURCES_DIR") or None)
        return cls(
            engine=engine,
            sources_dir=Path(sources).expanduser().resolve() if sources else engine.home,
            own_paths=engine.own_paths(env),
            max_body_bytes=positive_int(
                "PCBO_SERVER_MAX_BODY_BYTES", env.get("PCBO_SERVER_MAX_BODY_BYTES"), 64 * 1024 * 1024
            ),
            max_partitions=min(
                MAX_PARTITIONS,
                positive_int(
                    "PCBO_SERVER_MAX_PARTITIONS", env.get("PCBO_SERVER_MAX_PARTITIONS"), MAX_PARTITIONS
                ),
            ),
            request_timeout=positive_number(
                "PCBO_SERVER_REQUEST_TIMEOUT", env.get("PCBO_SERVER_REQUEST_TIMEOUT"), 300.0
            ),
            execute_workers=positive_int(
                "PCBO_SERVER_EXECUTE_WORKERS", env.get("PCBO_SERVER_EXECUTE_WORKERS"), 2
            ),
            plan_workers=positive_int("PCBO_SERVER_PLAN_WORKERS", env.get("PCBO_SERVER_PLAN_WORKERS"), 4),
            max_connections=positive_int(
                "PCBO_SERVER_MAX_CONNECTIONS", env.get("PCBO_SERVER_MAX_CONNECTIONS"), 512
            ),
            keep_alive_seconds=positive_number(
                "PCBO_SERVER_KEEPALIVE_SECONDS", env.get("PCBO_SERVER_KEEPALIVE_SECONDS"), 5.0
            ),
            read_seconds=positive_number(
                "PCBO_SERVER_READ_SECONDS", env.get("PCBO_SERVER_READ_SECONDS"), 30.0
            ),
            command_timeout=positive_number(
                "PCBO_SERVER_COMMAND_TIMEOUT", env.get("PCBO_SERVER_COMMAND_TIMEOUT"), 600.0
            ),
            reconcile_seconds=positive_number(
                "PCBO_RECONCILE_SECONDS", env.get("PCBO_RECONCILE_SECONDS"), 30.0
            ),
            heartbeat_seconds=positive_number(
                "PCBO_SSE_HEARTBEAT_SECONDS", env.get("PCBO_SSE_HEARTBEAT_SECONDS"), 15.0
            ),
            sse_queue_size=positive_int("PCBO_SSE_QUEUE_SIZE", env.get("PCBO_SSE_QUEUE_SIZE"), 256),
            streams_per_token=positive_int(
                "PCBO_SSE_STREAMS_PER_TOKEN", env.get("PCBO_SSE_STREAMS_PER_TOKEN"), 8
            ),
            shutdown_grace=positive_number(
                "PCBO_SERVER_SHUTDOWN_GRACE", env.get("PCBO_SERVER_SHUTDOWN_GRACE"), 600.0
            ),
            dagster_url=_dagster_url(env.get("PCBO_DAGSTER_URL") or None),
        )

    @property
    def sources(self) -> SourcesDirectory:
        """The sources directory a request's local files must lie in, pcbo's own stores refused."""
        return SourcesDirectory.of(self.sources_dir, self.own_paths)

    def with_changes(self, **changes: Any) -> ServerConfig:
        return replace(self, **changes)
