"""The reconciliation poll: every `PCBO_RECONCILE_SECONDS`, for each dataset version of the catalog,
and for each chain of the audit backup (one whose catalog row was deleted too),
a cheap comparison of its three stores, published as a `reconciliation.update` event.

Cheap means no data file is read: the audit chain (the source of truth) is read and verified at every
poll (every hash and link) and replayed (only when its head moved since the last poll), each
partition's commit point
(`_manifest.json`, a small file) is hashed, and the catalog's committed rows are read. Per partition
the chain's current version must have exactly that manifest checksum in the lake and in the catalog.
Rows and files are `pcbo verify`'s business; this poll says quickly whether anything moved.

`status`:
- `verified`: the three stores agree on every partition;
- `stale`: a run is writing the dataset (its lease is held) or the chain has an open intent — the
  stores are allowed to differ until it ends;
- `discrepancy`: they differ: `discrepancyDetails {expected, actual, missingIds}` — `expected` the
  chain's partitions and records, `actual` what the lake and the catalog hold, `missingIds` the
  partition keys whose lake or catalog state is not the chain's. A chain that does not verify vouches
  for nothing: every partition key the stores name is missing, and `auditChainFindings` says why.
  Each new discrepancy (a changed set of keys) is appended to `discrepancy_events` (kind
  `reconciliation_discrepancy`) once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from pcbo_dagster.audit.backup import ChainBackup
from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.core.audit_chain import split_chain_key
from pcbo_dagster.core.canonical import jcs
from pcbo_dagster.core.chain_state import ChainState, replay
from pcbo_dagster.engine.partition_checks import read_verified_chain
from pcbo_dagster.lake import layout
from pcbo_dagster.lake.storage import LakeStorage
from pcbo_dagster.server.broker import EventBroker

log = logging.getLogger("pcbo.server.reconciliation")
#: How many partition keys a discrepancy lists (its counts cover them all).
MAX_LISTED = 100


@dataclass
class _ChainCache:
    head: str | None
    state: ChainState
    events: int
    #: why the chain cannot be trusted (empty: it verifies)
    findings: list[str]


class Reconciler:
    """Compares catalog, lake and chain per dataset version and publishes what it finds."""

    def __init__(
        self, catalog: CatalogStore, lake: LakeStorage, backup: ChainBackup, broker: EventBroker
    ) -> None:
        self.catalog, self.lake, self.backup, self.broker = catalog, lake, backup, broker
        self._chains: dict[str, _ChainCache] = {}
        self._last_discrepancy: dict[str, str] = {}
        self.polls = 0
        #: The newest report per chain key (for the admin status).
        self.latest: dict[str, dict[str, Any]] = {}

    def poll(self) -> list[dict[str, Any]]:
        """One reconciliation of every dataset version; publishes and returns the reports."""
        self.polls += 1
        reports = []
        leases = {(r["dataset"], r["version_label"]) for r in self.catalog.leases()}
        # the catalog's dataset versions and every chain of the backup: a version whose catalog row
        # was deleted is still reconciled (its lake and its chain are still there)
        versions = {(r["dataset"], r["version_label"]) for r in self.catalog.datasets()}
        for key in self.backup.chain_keys():
            try:
                versions.add(split_chain_key(key))
            except ValueError:  # no chain's name: `pcbo verify` reports it
                continue
        for dataset, version_label in sorted(versions):
            try:
                report = self.reconcile(dataset, version_label, (dataset, version_label) in leases)
            except Exception as exc:  # one unreadable dataset must not stop the others
                log.warning("reconciliation of %s/%s failed: %s", dataset, version_label, type(exc).__name__)
                continue
            reports.append(report)
            self.broker.publish("reconciliation.update", report, dataset=dataset)
        return reports

    def _chain(self, chain_key: str) -> _ChainCache:
        # verified at every poll, not only replayed and not only when the head moved: an event edited
        # before the head (with the lake and the catalog to match, or after an earlier poll verified
        # it) would have the poll call forged stores `verified`. The replay is kept while the chain
        # verifies to the same head (its hashes pin every event).
        events, findings = read_verified_chain(self.backup, chain_key)
        head = events[-1].get("chain", {}).get("event_hash") if events else None
        cached = self._chains.get(chain_key)
        if findings or cached is None or cached.findings or cached.head != head:
            replayed = replay(events)
            cached = _ChainCache(head, replayed, len(events), findings + replayed.findings)
            self._chains[chain_key] = cached
        return cached

    def reconcile(self, dataset: str, version_label: str, lease_held: bool) -> dict[str, Any]:
        started = time.perf_counter()
        chain_key = f"{dataset}/{version_label}"
        chain = self._chain(chain_key)
        expected: dict[str, tuple[str, int]] = {}
        open_intents = []
        for key, history in chain.state.partitions.items():
            if history.open_intent is not None:
                open_intents.append(key)
            current = history.current_version
            if current is not None:
                expected[key] = (current.manifest_checksum, int(current.event.get("record_count", 0)))
        catalog_rows = self.catalog.current_partitions(dataset, version_label)
        lake_state: dict[str, str] = {}
        for key in sorted(set(expected) | set(catalog_rows)):
            data = self.lake.read_if_exists(layout.manifest(dataset, version_label, key))
            if data is not None:
                lake_state[key] = "sha256:" + hashlib.sha256(data).hexdigest()

        def disagrees(key: str) -> bool:
            if chain.findings:
                return True
            chain_checksum = expected[key][0] if key in expected else None
            row = catalog_rows.get(key)
            catalog_checksum = row["manifest_checksum"] if row is not None else None
            return lake_state.get(key) != chain_checksum or catalog_checksum != chain_checksum

        missing = sorted(key for key in set(expected) | set(catalog_rows) | set(lake_state) if disagrees(key))
        expected_records = sum(records for _, records in expected.values())
        catalog_records = sum(int(r["record_count"]) for r in catalog_rows.values())
        status = (
            "stale"
            if lease_held or open_intents
            else "discrepancy"
            if missing or chain.findings
            else "verified"
        )
        state_digest = hashlib.sha256(jcs(sorted([k, v[0]] for k, v in expected.items()))).hexdigest()
        report: dict[str, Any] = {
            "eventId": f"reconciliation:{self.polls}:{chain_key}",
            "service": dataset,
            "versionLabel": version_label,
            "status": status,
            "counts": {
                "partitions": len(expected),
                "records": expected_records,
                "lakePartitions": len(lake_state),
                "catalogPartitions": len(catalog_rows),
                "catalogRecords": catalog_records,
                "chainEvents": chain.events,
            },
            "checksum": "sha256:" + state_digest,
            "latencyMs": round((time.perf_counter() - started) * 1000, 3),
            "discrepancyDetails": None,
        }
        if status == "stale":
            report["staleReason"] = (
                "a run holds the dataset's lease" if lease_held else "an open intent on the chain"
            )
        if missing or chain.findings:
            report["discrepancyDetails"] = {
                "expected": {"partitions": len(expected), "records": expected_records},
                "actual": {
                    "lakePartitions": len(lake_state),
                    "catalogPartitions": len(catalog_rows),
                    "catalogRecords": catalog_records,
                },
                "missingIds": missing[:MAX_LISTED],
                "missingCount": len(missing),
            }
            if chain.findings:
                report["discrepancyDetails"]["auditChainFindings"] = chain.findings[:3]
        if status == "discrepancy":
            signature = ",".join(missing)
            if self._last_discrepancy.get(chain_key) != signature:
                self._last_discrepancy[chain_key] = signature
                self.catalog.record_discrepancy(
                    run_id="reconciliation",
                    dataset=dataset,
                    version_label=version_label,
                    partition_key=missing[0] if len(missing) == 1 else None,
                    kind="reconciliation_discrepancy",
                    detail=report["discrepancyDetails"],
                )
        elif status == "verified":
            self._last_discrepancy.pop(chain_key, None)
        self.latest[chain_key] = report
        return report
