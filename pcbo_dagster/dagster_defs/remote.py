"""`pcbo execute --dagster URL`: submit a request to a running Dagster webserver and wait for its outcome.

The request runs as a `pcbo_request` run (`backfill/jobs.py`) of the code location served at URL,
submitted through `dagster_graphql.DagsterGraphQLClient`; the run is polled with `get_run_status`
until it finishes, then its event log is read through the webserver's GraphQL API: the step output's
`execute_document` metadata (success) or the step failure's metadata (`pcbo_outcome`, `field`,
`message`, `document`) becomes what a local `pcbo execute` would have printed and exited with, plus
`dagsterRun: {runId, url}` naming the run (the run id is also in every error message):

| run outcome                               | raised here (CLI exit)                                  |
|-------------------------------------------|---------------------------------------------------------|
| success                                   | returns the execute document (0)                        |
| `pcbo_outcome=invalid_input`              | `InvalidInput(field, message)` (2)                      |
| `pcbo_outcome=blocked`                    | `Blocked` with the gate document (3)                    |
| `post_write_check_failed` / other failure | `RemoteRunFailed` with the document when there is one (1) |
| not finished within the timeout           | `RemoteRunFailed` naming the run (1); the run goes on   |

Dagster is imported only when this module is used, so `pcbo` works without the dagster extra.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pcbo_dagster.core.errors import Blocked, InvalidInput, PcboError
from pcbo_dagster.io.http_delivery import NoRedirect, deadline_opener, within
from pcbo_dagster.io.redaction import has_userinfo, quoted_answer, redact_url
from pcbo_dagster.sources.local_files import SourcesDirectory

#: Kept in step with `backfill/jobs.py` (not imported from it: that would import Dagster's core).
JOB_NAME = "pcbo_request"
OP_NAME = "execute_request"
DOCUMENT_ENTRY = "execute_document"
OUTCOME_ENTRY = "pcbo_outcome"
ACTOR_TAG = "pcbo/actor"
_TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
#: The most of one GraphQL answer read (a page of a run's events).
MAX_ANSWER_BYTES = 64 << 20

_EVENTS_QUERY = """
query PcboRunEvents($runId: ID!, $cursor: String) {
  logsForRun(runId: $runId, afterCursor: $cursor) {
    __typename
    ... on EventConnection {
      cursor
      hasMore
      events {
        __typename
        ... on MessageEvent { message }
        ... on ExecutionStepOutputEvent {
          stepKey
          metadataEntries { ...entry }
        }
        ... on ExecutionStepFailureEvent {
          stepKey
          error { message }
          failureMetadata {
            description
            metadataEntries { ...entry }
          }
        }
      }
    }
    ... on PythonError { message }
    ... on RunNotFoundError { message }
  }
}

fragment entry on MetadataEntry {
  label
  ... on JsonMetadataEntry { jsonString }
  ... on TextMetadataEntry { text }
}
"""


_OPENER = deadline_opener(NoRedirect())


class RemoteRunFailed(PcboError):
    """The Dagster run failed (or did not finish in time); `document` is printed when there is one."""

    exit_status = 1

    def __init__(self, message: str, document: dict[str, Any] | None = None) -> None:
        self.document = document
        super().__init__(message)


@dataclass(frozen=True)
class Webserver:
    """Where the Dagster webserver listens, parsed from a URL such as `http://127.0.0.1:3000/prefix`."""

    host: str
    port: int | None
    https: bool
    path_prefix: str

    @classmethod
    def parse(cls, url: str) -> Webserver:
        """The webserver of `url`; `InvalidInput` on `--dagster` (the URL shown redacted) when it is not
        an http(s) URL with a host and a valid port, or carries credentials (the client sends none)."""
        full = url if "://" in url else f"http://{url}"
        shown = redact_url(full)
        if has_userinfo(full):
            raise InvalidInput(
                "--dagster", f"{shown}: credentials in the URL are refused (the GraphQL client sends none)"
            )
        parts = urlsplit(full)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput("--dagster", f"must be an http(s) URL of the Dagster webserver, got {shown!r}")
        try:
            port = parts.port
        except ValueError:
            raise InvalidInput("--dagster", f"has an invalid port: {shown!r}") from None
        return cls(parts.hostname, port, parts.scheme == "https", parts.path.rstrip("/"))

    @property
    def base_url(self) -> str:
        port = f":{self.port}" if self.port else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.https else 'http'}://{host}{port}{self.path_prefix}"

    def client(self) -> Any:
        from dagster_graphql import DagsterGraphQLClient

        return DagsterGraphQLClient(
            self.host, port_number=self.port, use_https=self.https, path_prefix=self.path_prefix
        )

    def graphql(self, query: str, variables: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """POST a GraphQL query; its `data`. The whole exchange takes at most `timeout` seconds however
        slowly the webserver answers, an answer over `MAX_ANSWER_BYTES` is refused and a redirect is
        never followed (urllib would GET the URL it names, any host's, and take its answer):
        `RemoteRunFailed` naming which."""
        body = json.dumps({"query": query, "variables": variables}).encode("utf-8")
        request = urllib.request.Request(
            f"{self.base_url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        where = f"the Dagster webserver at {self.base_url}"
        with within(timeout) as deadline:
            try:
                with _OPENER.open(request, timeout=timeout) as response:
                    raw = response.read(MAX_ANSWER_BYTES + 1)
            except urllib.error.HTTPError as exc:
                exc.close()
                if not deadline.expired:
                    raise RemoteRunFailed(
                        f"{where} answered HTTP {exc.code} (redirects are not followed)"
                    ) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                if not deadline.expired:
                    raise RemoteRunFailed(f"cannot reach {where}: {quoted_answer(str(exc))}") from None
        if deadline.expired:
            raise RemoteRunFailed(f"{where} gave no whole answer within {timeout:g} s")
        if len(raw) > MAX_ANSWER_BYTES:
            raise RemoteRunFailed(f"{where} answered more than {MAX_ANSWER_BYTES} bytes")
        try:
            answer = json.loads(raw)
        except ValueError:
            raise RemoteRunFailed(f"{where} did not answer JSON") from None
        if not isinstance(answer, dict):
            raise RemoteRunFailed(f"{where} did not answer a JSON object")
        if answer.get("errors"):
            raise RemoteRunFailed(f"Dagster GraphQL error: {answer['errors'][0].get('message')}")
        return answer["data"]


def _entries(entries: list[dict[str, Any]] | None) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for entry in entries or []:
        if "jsonString" in entry:
            result[entry["label"]] = json.loads(entry["jsonString"])
        elif "text" in entry:
            result[entry["label"]] = entry["text"]
    return result


def run_events(server: Webserver, run_id: str) -> list[dict[str, Any]]:
    """Every event of the run's log, in order."""
    events: list[dict[str, Any]] = []
    cursor = None
    while True:
        data = server.graphql(_EVENTS_QUERY, {"runId": run_id, "cursor": cursor})["logsForRun"]
        if data["__typename"] != "EventConnection":
            raise RemoteRunFailed(f"cannot read the events of run {run_id}: {data.get('message')}")
        events.extend(data["events"])
        if not data["hasMore"]:
            return events
        cursor = data["cursor"]


def outcome_of(run_id: str, status: str, events: list[dict[str, Any]], run_url: str) -> dict[str, Any]:
    """The execute document of a finished run, or the exception its failure maps to. Every document
    (done, blocked or failed) names the run: `dagsterRun: {runId, url}`."""
    run = {"dagsterRun": {"runId": run_id, "url": run_url}}
    for event in events:
        if event["__typename"] == "ExecutionStepOutputEvent" and event.get("stepKey") == OP_NAME:
            entries = _entries(event["metadataEntries"])
            if DOCUMENT_ENTRY in entries and status == "SUCCESS":
                return {**entries[DOCUMENT_ENTRY], **run}
    for event in events:
        if event["__typename"] != "ExecutionStepFailureEvent":
            continue
        failure = event.get("failureMetadata") or {}
        entries = _entries(failure.get("metadataEntries"))
        outcome = entries.get(OUTCOME_ENTRY)
        description = failure.get("description") or (event.get("error") or {}).get("message") or ""
        document = entries.get("document")
        if outcome == "invalid_input":
            message = str(entries.get("message", description))
            raise InvalidInput(str(entries.get("field", "request")), f"{message} (Dagster run {run_id})")
        if outcome == "blocked":
            raise Blocked(description, {**(document or {}), **run})
        failed = None if document is None else {**document, **run}
        raise RemoteRunFailed(f"run {run_id} failed: {description} ({run_url})", failed)
    messages = [e.get("message") for e in events if e["__typename"] in ("RunFailureEvent", "EngineEvent")]
    detail = next((m for m in reversed(messages) if m), "no step failure recorded")
    raise RemoteRunFailed(f"run {run_id} ended {status}: {detail} ({run_url})")


def _client_error(exc: BaseException) -> str:
    """One line for an error of dagster-graphql's client: its first line and what caused it (the
    client's own text of a failed query is the whole query and its variables, not the failure)."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip():
        text = f"{text.rstrip(' :.')}: {type(cause).__name__}: {str(cause).strip().splitlines()[0]}"
    return text


def submit_request(
    url: str,
    request_text: str,
    base_dir: Path | None,
    tags: dict[str, str],
    timeout: float = 600.0,
    location: str | None = None,
    poll_interval: float = 0.5,
    on_submitted: Callable[[str], None] | None = None,
    confine_to: SourcesDirectory | None = None,
) -> dict[str, Any]:
    """Run the request as a `pcbo_request` run at `url`; the execute document when it succeeds.
    `on_submitted` is told the Dagster run id as soon as the run is submitted; `confine_to`: the run
    reads local sources only inside this directory (the HTTP API's sources directory; the run refuses
    the stores of its own settings there, `Settings.own_paths`)."""
    from dagster_graphql import DagsterGraphQLClientError

    server = Webserver.parse(url)
    client = server.client()
    config: dict[str, Any] = {"request_json": request_text}
    if base_dir is not None:
        config["base_dir"] = str(base_dir)
    if confine_to is not None:
        config["confine_to"] = confine_to.root
    try:
        run_id = client.submit_job_execution(
            JOB_NAME,
            repository_location_name=location,
            run_config={"ops": {OP_NAME: {"config": config}}},
            tags=tags,
        )
    except DagsterGraphQLClientError as exc:
        raise RemoteRunFailed(
            f"cannot submit {JOB_NAME} to Dagster at {server.base_url}: {_client_error(exc)}"
        ) from None
    except (OSError, urllib.error.URLError) as exc:
        raise RemoteRunFailed(f"cannot reach Dagster at {server.base_url}: {exc}") from None
    run_url = f"{server.base_url}/runs/{run_id}"
    if on_submitted is not None:
        on_submitted(run_id)
    deadline = time.monotonic() + timeout
    status = "QUEUED"
    while True:
        try:
            status = client.get_run_status(run_id).value
        except DagsterGraphQLClientError as exc:
            raise RemoteRunFailed(
                f"cannot read the status of run {run_id}: {_client_error(exc)} ({run_url})"
            ) from None
        if status in _TERMINAL:
            break
        if time.monotonic() >= deadline:
            hint = (
                " (a queued run starts when the dagster-daemon dequeues it: is the daemon running?)"
                if status == "QUEUED"
                else ""
            )
            raise RemoteRunFailed(
                f"run {run_id} did not finish within {timeout:g} s (status {status}){hint}; "
                f"it goes on: {run_url}"
            )
        time.sleep(poll_interval)
    return outcome_of(run_id, status, run_events(server, run_id), run_url)


def validate_and_submit(
    url: str,
    raw: bytes,
    base_dir: Path | None,
    *,
    timeout: float = 600.0,
    location: str | None = None,
    confine_to: SourcesDirectory | None = None,
    on_submitted: Callable[[str], None] | None = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """Validate and gate the request here (nothing is submitted when it fails: `InvalidInput`,
    `Blocked`), then run it on the Dagster webserver at `url` (`submit_request`). `pcbo execute
    --dagster` and the HTTP API's Dagster executes; `on_submitted` is told the Dagster run id;
    `actor` (the run tag `pcbo/actor`) is named in the run's audit events."""
    from pcbo_dagster.engine.backfill_commands import check_request_gates, evaluated_request

    with evaluated_request(raw, base_dir, confine_to) as evaluated:
        request = evaluated.loaded.request
        if request.target is not None:  # issue 15: see the pcbo_request job
            raise InvalidInput(
                "target", "a SQL table target runs with pcbo execute or as its dataset's asset"
            )
        check_request_gates(evaluated)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("--input", "must be UTF-8 JSON to be submitted to Dagster") from None
    tags = {"pcbo/run_id": request.runId, "pcbo/dataset": f"{request.dataset}/{request.versionLabel}"}
    if actor is not None:
        tags[ACTOR_TAG] = actor
    return submit_request(
        url,
        text,
        base_dir,
        tags=tags,
        timeout=timeout,
        location=location,
        on_submitted=on_submitted,
        confine_to=confine_to,
    )
