"""`pcbo_request`: run one backfill request (the `pcbo execute --input` JSON) through the engine.

Launch it from the UI launchpad (Jobs > pcbo_request > Launchpad) with the request as a JSON text:

```yaml
ops:
  execute_request:
    config:
      request_json: |
        {"runId": "retro-run-001", "dataset": "events", "versionLabel": "v1",
         "start": "2024-01-01T00:00:00Z", "end": "2024-01-02T00:00:00Z", "chunkSeconds": 3600,
         "policies": {"requireConsent": true, "allowedJurisdictions": ["US", "CA"]},
         "sourceRecords": [{"id": "rec-1", "occurredAt": "2024-01-01T00:15:00Z",
                            "jurisdiction": "US", "consentGranted": true}]}
      # base_dir: /data/requests   # where a relative source.uri resolves (optional)
```

The request is a JSON *text*, not a YAML mapping, on purpose: it is parsed by the engine's strict
parser exactly as `pcbo execute --input` parses a file (duplicate keys, NaN, floats in metadata,
unknown fields are refused; numbers keep their JSON form, so the plan and decision hashes are the
same as the CLI's). A YAML block scalar (`request_json: |`) takes the JSON pasted as it is.
`pcbo execute --dagster URL --input req.json` submits this job with that config.

The op runs the engine path of `pcbo execute`: `load_request` -> `evaluate` (the policy gate is
logged) -> `check_gates` -> `execute` (parquet, commit, audit chain, reconciliation) on the `pcbo`
resource's environment, and returns the execute document as its output, also attached as the output's
metadata `execute_document` (JSON; `pcbo execute --dagster` reads it back through GraphQL).

Outcomes (none is retried): invalid input -> `Failure` "invalid input: <field>: <message>" with
metadata `pcbo_outcome=invalid_input`, `field`, `message`; a gate -> `Failure` with
`pcbo_outcome=blocked` and the gate document (`document`, nothing written); a failed post-write
check -> `Failure` with `pcbo_outcome=post_write_check_failed` and the execute document.

`base_dir` (where a relative `source.uri` resolves) defaults to the `pcbo` resource's
`sources.base_dir`, else the `sources_dir` of the datasets config the code location loaded (its
file's directory; `PCBO_HOME` for the packaged example).
"""

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from pcbo_dagster.core.errors import Blocked, InvalidInput, PcboError
from pcbo_dagster.dagster_defs.backfill.steps import log_execution, log_policy_gate, progress_logger
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.engine.execute import ExecuteFailed, check_gates, execute
from pcbo_dagster.engine.request_loading import evaluate, load_request
from pcbo_dagster.sources.local_files import SourcesDirectory

JOB_NAME = "pcbo_request"
OP_NAME = "execute_request"
#: Output metadata entry holding the execute document (JSON).
DOCUMENT_ENTRY = "execute_document"
#: Failure metadata entry naming the outcome: invalid_input | blocked | post_write_check_failed | error.
OUTCOME_ENTRY = "pcbo_outcome"
#: The run tag naming who submitted the run (the HTTP API sets it to the token's subject): the actor
#: named in the audit events the run appends.
ACTOR_TAG = "pcbo/actor"


class PcboRequestConfig(dg.Config):
    """The op's run config: the request JSON text and, optionally, where relative sources resolve."""

    request_json: str = Field(
        description="The request: the same camelCase JSON text as `pcbo execute --input` reads"
    )
    base_dir: str | None = Field(
        default=None,
        description="Directory a relative source.uri resolves against (default: the pcbo resource's "
        "sources.base_dir, else the datasets config's sources directory)",
    )
    confine_to: str | None = Field(
        default=None,
        description="Read local sources only inside this directory, symbolic links followed included "
        "(what pcbo serve sets on the runs it submits: its sources directory)",
    )


def _failure(outcome: str, description: str, metadata: dict[str, Any]) -> dg.Failure:
    return dg.Failure(
        description=description,
        metadata={OUTCOME_ENTRY: dg.MetadataValue.text(outcome), **metadata},
        allow_retries=False,
    )


def _output_metadata(document: dict[str, Any]) -> dict[str, Any]:
    partitions = document["partitions"]
    totals = document["totals"]
    return {
        DOCUMENT_ENTRY: dg.MetadataValue.json(document),
        "status": dg.MetadataValue.text(document["status"]),
        "pcbo_run_id": dg.MetadataValue.text(document["runId"]),
        "dataset": dg.MetadataValue.text(f"{document['dataset']}/{document['versionLabel']}"),
        "plan_hash": dg.MetadataValue.text(document["planHash"]),
        "decision_hash": dg.MetadataValue.text(document["decisionHash"]),
        "partitions": dg.MetadataValue.int(len(partitions)),
        "committed": dg.MetadataValue.int(totals["committed"]),
        "unchanged": dg.MetadataValue.int(totals["unchanged"]),
        "dagster/row_count": dg.MetadataValue.int(sum(p["recordCount"] for p in partitions)),
        "reconciliation": dg.MetadataValue.text(document["reconciliation"]["status"]),
    }


def build_request_job(default_base_dir: str | os.PathLike[str] | None = None) -> dg.JobDefinition:
    """The `pcbo_request` job; relative sources resolve against `default_base_dir` unless configured."""

    @dg.op(
        name=OP_NAME,
        out=dg.Out(dict, description="The execute document (CONTRACT section 3)"),
        tags={"kind": "pcbo"},
    )
    def execute_request(
        context: dg.OpExecutionContext, config: PcboRequestConfig, pcbo: PcboEngineResource
    ) -> dg.Output:
        base = (
            Path(config.base_dir).expanduser().resolve()
            if config.base_dir
            else pcbo.sources.base(default_base_dir)
        )
        context.log.info(f"engine {json.dumps(pcbo.describe())}; relative sources resolve against {base}")
        try:
            confine = (
                SourcesDirectory.of(Path(config.confine_to).expanduser(), pcbo.settings().own_paths())
                if config.confine_to
                else None
            )
            loaded = load_request(config.request_json.encode("utf-8"), base, confine)
            if loaded.request.target is not None:  # issue 15: SQL targets run as their dataset's asset
                raise InvalidInput(
                    "target", "a SQL table target runs as its dataset's asset (or pcbo execute), not here"
                )
            plan, decisions = evaluate(loaded)
        except InvalidInput as exc:
            raise _failure(
                "invalid_input",
                f"invalid input: {exc}",
                {"field": dg.MetadataValue.text(exc.field), "message": dg.MetadataValue.text(exc.message)},
            ) from None
        request = loaded.request
        keys = [p.key for p in plan.partitions]
        context.log.info(
            f"request {request.runId}: {request.dataset}/{request.versionLabel}, {len(keys)} partition(s), "
            f"{loaded.record_count} record(s) from {loaded.source_kind} source"
        )
        log_policy_gate(context, decisions, keys)
        try:
            check_gates(loaded, decisions)
        except Blocked as exc:
            document = exc.document
            raise _failure(
                "blocked",
                f"blocked by the {document.get('gate')} gate, nothing written: {exc}",
                {
                    "gate": dg.MetadataValue.text(str(document.get("gate"))),
                    "document": dg.MetadataValue.json(document),
                },
            ) from None
        context.log.info(f"gates passed (onViolation={request.policies.onViolation}): executing")
        try:
            with pcbo.environment(actor=context.run.tags.get(ACTOR_TAG)) as env:
                document = execute(env, loaded, plan, decisions, progress=progress_logger(context, len(keys)))
        except ExecuteFailed as exc:
            raise _failure(
                "post_write_check_failed",
                f"post-write reconciliation failed; the partition was rolled back: {exc}",
                {"document": dg.MetadataValue.json(exc.document)},
            ) from None
        except PcboError as exc:
            extra = getattr(exc, "document", None)
            metadata = {} if extra is None else {"document": dg.MetadataValue.json(extra)}
            raise _failure("error", f"{exc.__class__.__name__}: {exc}", metadata) from None
        log_execution(context, document)
        return dg.Output(document, metadata=_output_metadata(document))

    @dg.job(
        name=JOB_NAME,
        description="Execute one backfill request (the `pcbo execute --input` JSON) through the engine",
        tags={"pcbo/kind": "request"},
    )
    def pcbo_request() -> None:
        execute_request()

    return pcbo_request


#: The job with relative sources resolved against the sources resource's base_dir or the cwd.
pcbo_request_job = build_request_job()
