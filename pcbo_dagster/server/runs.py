"""Executes through the API: each runs in a worker thread (never on the event loop), through the
engine's `execute_request` (or, asked for and configured, as a Dagster run), and is recorded in
`api_runs` under the request's `runId`.

An answer is `(HTTP status, body, headers)`: 200 and the execute document, or what
`errors.engine_error_response` makes of the engine's error. Progress goes to the event stream:
`run.status` (queued, running, then the final status) and `run.progress` (partitions done of total).

Shutdown (`shutdown`): no new execute is accepted (503), queued ones that have not started are marked
`interrupted`, and running ones are waited for up to the grace period; the worker threads are joined
before the process exits in any case, and an execute killed outright (SIGKILL, power loss) is healed
by the next execute of the same request or `pcbo verify --repair` (the engine's crash windows).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.core.canonical import prefixed, sha256_hex
from pcbo_dagster.engine.backfill_commands import execute_request
from pcbo_dagster.engine.request_loading import ValidatedRequest
from pcbo_dagster.server.broker import EventBroker
from pcbo_dagster.server.config import ServerConfig
from pcbo_dagster.server.errors import ApiError, engine_error_response

log = logging.getLogger("pcbo.server.runs")
FINAL_STATUS = {200: "done", 409: "blocked", 422: "invalid"}


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "body": self.body, "headers": self.headers}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Answer:
        return cls(int(value["status"]), value["body"], dict(value.get("headers") or {}))


def request_digest(raw: bytes) -> str:
    return prefixed(sha256_hex(raw))


def check_run_id(catalog: CatalogStore, run_id: str, dataset: str, field: str = "runId") -> None:
    """409 `run_id_taken` when `run_id` is another dataset's run: an API run's (`api_runs`) or one the
    engine recorded (`runs`: a CLI, Dagster or command run), whose row an execute of that id would
    rewrite. The answer names neither the other dataset nor the run's state."""
    api_run = catalog.get_api_run(run_id)
    engine_run = catalog.get_run(run_id)
    if any(row is not None and row["dataset"] != dataset for row in (api_run, engine_run)):
        raise ApiError(
            409, "run_id_taken", f"{field} {run_id!r} is another dataset's run: choose another runId"
        )


class RunManager:
    def __init__(self, config: ServerConfig, catalog: CatalogStore, broker: EventBroker) -> None:
        self.config, self.catalog, self.broker = config, catalog, broker
        self.executor = ThreadPoolExecutor(
            max_workers=config.execute_workers, thread_name_prefix="pcbo-execute"
        )
        self.accepting = True
        self._futures: dict[str, Future[Answer]] = {}
        self._lock = threading.Lock()

    def in_flight(self) -> list[str]:
        with self._lock:
            return [run_id for run_id, future in self._futures.items() if not future.done()]

    def submit(
        self,
        *,
        run_id: str,
        dataset: str,
        version_label: str,
        raw: bytes,
        validated: ValidatedRequest | None = None,
        actor: str,
        dagster: bool,
    ) -> Future[Answer]:
        """Record the run as queued and start it in a worker; 409 when a run of that id is in flight,
        or when another dataset's run holds that id (its record is left as it is, and the answer says
        nothing of it: not its dataset, nor whether it is in flight); 503 when the server is shutting
        down."""
        if not self.accepting:
            raise ApiError(
                503, "shutting_down", "the server is shutting down: submit the execute again later"
            )
        digest = request_digest(raw)
        with self._lock:
            check_run_id(self.catalog, run_id, dataset)  # an engine run's id too (api_runs: below)
            fields = dict(
                run_id=run_id, actor=actor, dataset=dataset, version_label=version_label, request_hash=digest
            )
            existing = self.catalog.create_api_run(**fields)
            if existing is not None:
                if existing["dataset"] != dataset:
                    raise ApiError(
                        409,
                        "run_id_taken",
                        f"runId {run_id!r} is another dataset's run: choose another runId",
                    )
                current = self._futures.get(run_id)
                if current is not None and not current.done():
                    raise ApiError(
                        409,
                        "run_in_progress",
                        f"run {run_id!r} is in progress: GET /v1/runs/{run_id} for its status",
                    )
                if existing["status"] in ("queued", "running") or not self.catalog.replace_api_run(**fields):
                    raise ApiError(
                        409, "run_in_progress", f"run {run_id!r} is in progress on another server process"
                    )
            self._publish_status(run_id, dataset, "queued", actor=actor)
            future = self.executor.submit(self._run, run_id, dataset, raw, validated, actor, dagster)
            self._futures[run_id] = future
        return future

    def _publish_status(self, run_id: str, dataset: str, status: str, **extra: Any) -> None:
        self.broker.publish(
            "run.status", {"runId": run_id, "dataset": dataset, "status": status, **extra}, dataset
        )

    @contextmanager
    def _progress(self, run_id: str, dataset: str, total: int) -> Iterator[Callable[[int], None]]:
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            self.broker.publish(
                "run.progress", {"runId": run_id, "dataset": dataset, "done": done, "total": total}, dataset
            )

        self.broker.publish(
            "run.progress", {"runId": run_id, "dataset": dataset, "done": 0, "total": total}, dataset
        )
        yield advance

    def _run(
        self,
        run_id: str,
        dataset: str,
        raw: bytes,
        validated: ValidatedRequest | None,
        actor: str,
        dagster: bool,
    ) -> Answer:
        self.catalog.update_api_run(run_id, "running")
        self._publish_status(run_id, dataset, "running")
        sources, confined = self.config.sources_dir, self.config.sources
        try:
            if dagster:
                from pcbo_dagster.dagster_defs.remote import validate_and_submit

                assert self.config.dagster_url is not None
                document = validate_and_submit(
                    self.config.dagster_url,
                    raw,
                    sources,
                    timeout=self.config.dagster_timeout,
                    confine_to=confined,
                    actor=actor,
                    on_submitted=lambda dagster_run: self._dagster_submitted(run_id, dataset, dagster_run),
                )
            else:
                document = execute_request(
                    self.config.engine,
                    raw if validated is None else validated,
                    sources,
                    confine_to=confined,
                    actor=actor,
                    progress=lambda total: self._progress(run_id, dataset, total),
                )
            answer = Answer(200, document, {})
        except Exception as exc:  # every failure becomes the answer the CLI's exit status stands for
            response = engine_error_response(exc)
            headers = {
                k: v for k, v in response.headers.items() if k.lower() in ("pcbo-message", "retry-after")
            }
            answer = Answer(response.status_code, json.loads(bytes(response.body)), headers)
            if answer.status >= 500:
                log.warning(
                    "run %s failed: %s", run_id, answer.body.get("message") or answer.body.get("status")
                )
        status = FINAL_STATUS.get(answer.status, "failed")
        self.catalog.update_api_run(run_id, status, http_status=answer.status, document=answer.to_json())
        self._publish_status(run_id, dataset, status, httpStatus=answer.status)
        return answer

    def _dagster_submitted(self, run_id: str, dataset: str, dagster_run_id: str) -> None:
        self.catalog.update_api_run(run_id, "running", dagster_run_id=dagster_run_id)
        self._publish_status(run_id, dataset, "running", dagsterRunId=dagster_run_id)

    def shutdown(self, grace: float) -> list[str]:
        """Stop accepting, interrupt what has not started, wait up to `grace` seconds for the rest;
        returns the run ids still running after the grace (the process joins them before it exits)."""
        self.accepting = False
        with self._lock:
            futures = dict(self._futures)
        for run_id, future in futures.items():
            if future.cancel():
                self.catalog.update_api_run(
                    run_id,
                    "interrupted",
                    document={
                        "status": 503,
                        "body": {
                            "error": "interrupted",
                            "message": "the server stopped before this execute started: submit it again",
                        },
                        "headers": {},
                    },
                    http_status=503,
                )
        running = [f for f in futures.values() if not f.cancelled()]
        _, not_done = wait_futures(running, timeout=grace)
        self.executor.shutdown(wait=False, cancel_futures=True)
        return [run_id for run_id, future in futures.items() if future in not_done]
