"""From request bytes to a plan and its decisions: the evaluation shared by every command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcbo_dagster.core.canonical import CanonicalizationError, record_digests
from pcbo_dagster.core.decisions import Decisions, decide
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.plan import Plan, build_plan
from pcbo_dagster.core.request_model import BackfillRequest, parse_json_strict, validate_request
from pcbo_dagster.sources.ledger_archives import iter_ledger_records
from pcbo_dagster.sources.record_files import load_records, resolve_uri


@dataclass
class LoadedRequest:
    request: BackfillRequest
    records: list[Any]
    digests: list[str]
    source_uri: str
    source_kind: str


def load_request(raw: bytes, base_dir: Path | None = None) -> LoadedRequest:
    """Parse, validate and read the records of a request; `InvalidInput` on any bad input."""
    parsed = parse_json_strict(raw)
    request = validate_request(parsed.value)
    if request.source is not None and request.source.format == "ledger_archive":
        uri = resolve_uri(request.source.uri, base_dir)
        span = request.ledgerRange
        records, risky = list(iter_ledger_records(uri, span.first, span.end)), False
        kind, field = "ledger_archive", "source"
    elif request.source is not None:
        records, risky, uri = load_records(request.source, base_dir)
        kind, field = request.source.resolved_format(), "source"
    else:
        records, risky, uri, kind, field = (
            request.sourceRecords or [],
            parsed.may_hold_floats_or_big_ints,
            "inline",
            "inline",
            "sourceRecords",
        )
    try:
        digests = record_digests(records, risky)
    except CanonicalizationError as exc:
        index, reason = exc.args[0], exc.args[1] if len(exc.args) > 1 else str(exc)
        raise InvalidInput(f"{field}[{index}]", f"not representable as RFC 8785 JSON: {reason}") from None
    return LoadedRequest(request, records, digests, uri, kind)


def evaluate(loaded: LoadedRequest) -> tuple[Plan, Decisions]:
    plan = build_plan(loaded.request, loaded.digests)
    decisions = decide(plan, loaded.records, loaded.digests, list(loaded.request.existingTargetIds))
    return plan, decisions
