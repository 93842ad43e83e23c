"""What `GET /services/registered` and `GET /v1/admin/status` report."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pcbo_dagster.audit.backup import ChainBackup
from pcbo_dagster.audit.delivery import read_cursor
from pcbo_dagster.audit.object_store_backup import ObjectStoreAuditBackup
from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import format_datetime
from pcbo_dagster.io.clock import utc_now
from pcbo_dagster.io.http_delivery import NoRedirect, deadline_opener, url_as_sent, within
from pcbo_dagster.io.redaction import one_line_error, redact_url
from pcbo_dagster.lake.storage import LakeStorage
from pcbo_dagster.server.config import ServerConfig

PROBE_TIMEOUT_SECONDS = 2.0


def instant(value: datetime | None) -> str | None:
    """A catalog time (naive UTC) as the API writes instants (`core/instants.format_datetime`)."""
    return None if value is None else format_datetime(value)


def latest_checkpoint(
    config: ServerConfig, catalog: CatalogStore, chain_keys: Sequence[str]
) -> dict[str, Any]:
    """Whether this server's runs sign checkpoints (`PCBO_SIGNING_KEY`), and the newest stored
    checkpoint of each of `chain_keys` (`engine/transparency_log.stored_checkpoints`: a row that
    agrees with its note, with the cosignatures that verify under the witness keys they name), the
    most recently recorded one as `checkpoint`. `pcbo verify` checks their signatures."""
    from pcbo_dagster.engine.transparency_log import full_note, latest_stored_checkpoint

    chains = []
    for chain_key in chain_keys:
        row = latest_stored_checkpoint(catalog, chain_key)
        if row is None:
            continue
        chains.append(
            {
                "chainKey": chain_key,
                "origin": row["origin"],
                "treeSize": row["tree_size"],
                "signerKey": row["signer_key"],
                "recordedAt": instant(row["recorded_at"]),
                "witnesses": [c["witness_key"] for c in row["cosignatures"]],
                "checkpoint": full_note(row).render(),
            }
        )
    newest = max(chains, key=lambda c: (c["recordedAt"], c["chainKey"]), default=None)
    return {"configured": config.engine.signing_key is not None, "checkpoint": newest, "chains": chains}


def witnesses(config: ServerConfig) -> list[dict[str, Any]]:
    """The checkpoint witnesses this server's runs ask to cosign (`PCBO_WITNESSES`), each probed now
    (`up`: it answers HTTP at its URL)."""
    from pcbo_dagster.engine.transparency_log import witnesses_of

    settings = config.engine
    started = time.perf_counter()
    try:
        configured = witnesses_of(settings.witnesses, settings.witnesses_field)
    except InvalidInput as exc:
        return [_service("witnesses", "witness", "down", started, url=None, error=str(exc))]
    found = []
    for witness in configured:
        started = time.perf_counter()
        health, error = _http_probe(witness.url)
        found.append(
            _service(
                f"witness:{witness.key.name}",
                "witness",
                health,
                started,
                url=redact_url(witness.url),
                key=witness.key.text,
                error=error,
            )
        )
    return found


def _service(service_id: str, kind: str, health: str, started: float, **detail: Any) -> dict[str, Any]:
    return {
        "id": service_id,
        "type": kind,
        "health": health,
        "lastCheck": instant(utc_now()),
        "latencyMs": round((time.perf_counter() - started) * 1000, 3),
        **detail,
    }


_PROBE_OPENER = deadline_opener(NoRedirect())  # (a 3xx answers: the URL it names is never asked)


def _http_probe(url: str) -> tuple[str, str | None]:
    """`up` when anything answers HTTP at `url` (even an error status) within
    `PROBE_TIMEOUT_SECONDS` in all, however slowly it drips its answer; else `down` and why. Its host
    is asked without the URL's userinfo (`url_as_sent`), a credential for deliveries, not probes."""
    with within(PROBE_TIMEOUT_SECONDS) as deadline:
        try:
            with _PROBE_OPENER.open(url_as_sent(url), timeout=PROBE_TIMEOUT_SECONDS):
                pass
        except urllib.error.HTTPError:
            pass
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            if not deadline.expired:
                reason = getattr(exc, "reason", None)
                return "down", one_line_error(reason if isinstance(reason, BaseException) else exc)
    if deadline.expired:
        return "down", f"no whole answer within {PROBE_TIMEOUT_SECONDS:g} s"
    return "up", None


def registered_services(
    config: ServerConfig, catalog: CatalogStore, lake: LakeStorage, backup: ChainBackup
) -> list[dict[str, Any]]:
    """Catalog, lake, audit backup and endpoint, Dagster and witnesses, each probed now."""
    settings = config.engine
    services = []
    started = time.perf_counter()
    try:
        catalog.at_head()
        with catalog.read() as conn:
            conn.exec_driver_sql("SELECT 1")
        services.append(
            _service(
                "catalog", "catalog", "up", started, url=redact_url(catalog.url), dialect=catalog.dialect
            )
        )
    except Exception as exc:
        services.append(
            _service(
                "catalog", "catalog", "down", started, url=redact_url(catalog.url), error=one_line_error(exc)
            )
        )
    started = time.perf_counter()
    try:
        present = bool(lake.fs.exists(lake.root))  # a round trip to an object store
        services.append(
            _service("lake", "lake", "up", started, url=redact_url(settings.lake_url), present=present)
        )
    except Exception as exc:
        services.append(
            _service(
                "lake", "lake", "down", started, url=redact_url(settings.lake_url), error=one_line_error(exc)
            )
        )
    started = time.perf_counter()
    if isinstance(backup, ObjectStoreAuditBackup):  # the store every host shares: a round trip to it
        try:
            backup.fs.exists(backup.root)
            services.append(_service("audit-backup", "audit_backup", "up", started, url=backup.location))
        except Exception as exc:
            services.append(
                _service(
                    "audit-backup",
                    "audit_backup",
                    "down",
                    started,
                    url=backup.location,
                    error=one_line_error(exc),
                )
            )
    else:
        backup_ok = settings.audit_dir.is_dir() or not settings.audit_dir.exists()
        services.append(
            _service(
                "audit-backup",
                "audit_backup",
                "up" if backup_ok else "down",
                started,
                path=str(settings.audit_dir),
            )
        )
    started = time.perf_counter()
    if settings.audit_endpoint:
        health, error = _http_probe(settings.audit_endpoint)
        services.append(
            _service(
                "audit-endpoint",
                "audit_endpoint",
                health,
                started,
                url=redact_url(settings.audit_endpoint),
                error=error,
            )
        )
    else:
        services.append(_service("audit-endpoint", "audit_endpoint", "not_configured", started, url=None))
    started = time.perf_counter()
    if config.dagster_url:
        health, error = _http_probe(config.dagster_url.rstrip("/") + "/server_info")
        services.append(
            _service("dagster", "dagster", health, started, url=redact_url(config.dagster_url), error=error)
        )
    else:
        services.append(_service("dagster", "dagster", "not_configured", started, url=None))
    for witness in witnesses(config):
        services.append(witness)
    return services


def _undelivered(config: ServerConfig, backup: ChainBackup, chain_key: str) -> int | None:
    """Events of the chain not yet delivered to the audit endpoint (None: no endpoint configured); with
    the operator's key, counted from a cursor it signed only (else from seq 0, as delivery does)."""
    if not config.engine.audit_endpoint:
        return None
    last = backup.last_event(chain_key)
    if last is None:
        return 0
    from pcbo_dagster.engine.transparency_log import operator_verifier_of

    try:
        cursor = read_cursor(backup, chain_key, operator_verifier_of(config.engine))
    except ValueError:
        return int(last["chain"]["seq"]) + 1
    return int(last["chain"]["seq"]) - (-1 if cursor is None else cursor[0])


def _freshness(rows: Sequence[Any]) -> dict[str, Any]:
    """The newest committed partition and the gaps between the first and the newest (keys whose
    partition is not committed, on the grid of the most common step between committed keys)."""
    from pcbo_dagster.core.partition_keys import parse_ledger_key, parse_time_key

    def position(key: str) -> int:
        return parse_ledger_key(key)[0] if key.startswith("range=") else parse_time_key(key)

    committed = sorted((r for r in rows if r["status"] == "committed"), key=lambda r: r["partition_key"])
    if not committed:
        return {
            "newestPartition": None,
            "newestCommittedAt": None,
            "partitions": 0,
            "gaps": 0,
            "firstGaps": [],
        }
    newest = max(committed, key=lambda r: r["committed_at"])
    try:
        starts = sorted(position(r["partition_key"]) for r in committed)
    except ValueError:
        starts = []
    gaps: list[list[int]] = []
    step = 0
    if len(starts) > 1:
        steps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        step = max(set(steps), key=steps.count)
        for a, b in zip(starts, starts[1:], strict=False):
            if step > 0 and b - a > step:
                gaps.append([a + step, b])
    return {
        "newestPartition": committed[-1]["partition_key"],
        "newestCommittedAt": instant(newest["committed_at"]),
        "partitions": len(committed),
        "gaps": sum((b - a) // step for a, b in gaps) if gaps else 0,
        "firstGaps": [_gap_keys(committed[0]["partition_key"], a, b, step) for a, b in gaps[:20]],
    }


def _gap_keys(example: str, first: int, end: int, step: int) -> dict[str, Any]:
    """A gap [first, end) on the grid as the keys of its first and last missing partitions."""
    from pcbo_dagster.core.partition_keys import format_ledger_key, format_time_key

    last = end - step
    if example.startswith("range="):
        return {
            "from": format_ledger_key(first, first + step - 1),
            "to": format_ledger_key(last, last + step - 1),
        }
    return {"from": format_time_key(first), "to": format_time_key(last)}


def _of_datasets(row: dict[str, Any] | None, datasets: Sequence[str] | None) -> bool:
    """Whether a token limited to `datasets` (None: every dataset) may see the run `row` (None: a run
    whose dataset is not known: only an unlimited token sees it)."""
    return datasets is None or (row is not None and row["dataset"] in datasets)


def admin_status(
    config: ServerConfig,
    catalog: CatalogStore,
    backup: ChainBackup,
    runs_in_flight: Sequence[str],
    reconciliation: dict[str, dict[str, Any]],
    datasets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Leases held and waiting, runs in flight, freshness per dataset, undelivered audit events, the
    latest checkpoint; of `datasets` only, when the token is limited to them."""
    leases = []
    held = set()
    for row in catalog.leases():
        if datasets is not None and row["dataset"] not in datasets:
            continue
        try:
            holder = json.loads(row["holder"])
        except ValueError:
            holder = {}
        held.add((row["dataset"], row["version_label"]))
        leases.append(
            {
                "dataset": row["dataset"],
                "versionLabel": row["version_label"],
                "runId": holder.get("run"),
                "pid": holder.get("pid"),
                "host": holder.get("host"),
                "acquiredAt": instant(row["acquired_at"]),
                "expiresAt": instant(row["expires_at"]),
            }
        )
    api_runs = [r for r in catalog.api_runs_in_flight() if datasets is None or r["dataset"] in datasets]
    waiting = [
        {
            "runId": r["run_id"],
            "dataset": r["dataset"],
            "versionLabel": r["version_label"],
            "status": r["status"],
        }
        for r in api_runs
        if (r["dataset"], r["version_label"]) in held
        and not any(lease["runId"] == r["run_id"] for lease in leases)
    ]
    engine_runs = [
        {
            "runId": r["run_id"],
            "dataset": r["dataset"],
            "versionLabel": r["version_label"],
            "startedAt": instant(r["started_at"]),
        }
        for r in catalog.runs()
        if r["status"] == "running" and (datasets is None or r["dataset"] in datasets)
    ]
    per_dataset = []
    versions = catalog.partition_versions()
    for row in catalog.datasets():
        dataset, version_label = row["dataset"], row["version_label"]
        if datasets is not None and dataset not in datasets:
            continue
        chain_key = f"{dataset}/{version_label}"
        rows = [r for r in versions if r["dataset"] == dataset and r["version_label"] == version_label]
        report = reconciliation.get(chain_key)
        per_dataset.append(
            {
                "dataset": dataset,
                "versionLabel": version_label,
                "freshness": _freshness(rows),
                "undeliveredAuditEvents": _undelivered(config, backup, chain_key),
                "reconciliation": None if report is None else report["status"],
            }
        )
    return {
        "leases": {"held": leases, "waiting": waiting},
        "runsInFlight": {
            "engine": engine_runs,
            "api": [
                {"runId": r["run_id"], "dataset": r["dataset"], "status": r["status"], "actor": r["actor"]}
                for r in api_runs
            ],
            "thisServer": sorted(r for r in runs_in_flight if _of_datasets(catalog.get_api_run(r), datasets)),
        },
        "datasets": per_dataset,
        "auditDelivery": {
            "endpoint": redact_url(config.engine.audit_endpoint) if config.engine.audit_endpoint else None
        },
        "latestCheckpoint": latest_checkpoint(
            config, catalog, [f"{d['dataset']}/{d['versionLabel']}" for d in per_dataset]
        ),
    }
