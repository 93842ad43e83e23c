"""Verdicts on committed partitions, as plain findings (no Dagster): what the checks beside the
Dagster assets report, and what the soak re-checks in staging.

Each verdict re-reads what was committed (never trusts the run) and returns a `Verdict`: passed or
not, and its details as plain JSON values (`dagster_defs/backfill/checks.py` only wraps them into
asset check results):

- `reconciliation`: the partition's committed manifest names files that exist with the recorded
  size and SHA-256, hold the recorded rows, ids unique and sorted, as many as the manifest's record
  count and decided adds, and the RFC 6962 root recomputed from those ids is the manifest's Merkle
  root (`engine.partition_reading`, shared with `pcbo verify`);
- `compliance`: no written row breaks the given policies or is one of the existing target ids
  (`policy_violations`, shared with the soak's `policy_violations` check); records whether the
  manifest was committed under those policies;
- `chain_verdict`: the dataset's audit chain in the local backup verifies offline (every hash
  recomputed, every link, the catalog's head) and holds the `partition_committed` event of the
  partition's committed manifest, with its Merkle root;
- `coverage`: the committed partitions against a list of keys up to the last committed one (gaps),
  and how many keys remain after it.

`verified_chain` is the chain every decision that writes, heals, restores or proves reads: the same
check, plus the history the catalog's stored transparency log and its checkpoints hold; a chain that
fails it is refused (`ChainNotVerified`, exit 1), never replayed as it lies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pcbo_dagster.audit.backup import ChainBackup
from pcbo_dagster.core import merkle
from pcbo_dagster.core.audit_chain import verify_chain
from pcbo_dagster.core.chain_state import ChainState, replay
from pcbo_dagster.core.compliance import violations
from pcbo_dagster.core.errors import IntegrityError
from pcbo_dagster.core.operator_signatures import writer_refusal
from pcbo_dagster.core.plan import NormalizedPolicies
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.events import chain_key
from pcbo_dagster.engine.partition_reading import PartitionReading, read_commit_point, read_partition
from pcbo_dagster.engine.transparency_log import other_history
from pcbo_dagster.lake import layout
from pcbo_dagster.lake.storage import LakeStorage

#: How many findings, violations or keys a verdict lists (its counts cover them all).
MAX_LISTED = 20


@dataclass(frozen=True)
class Verdict:
    """One check's outcome: `details` hold plain JSON values (numbers, text, lists of findings)."""

    passed: bool
    details: dict[str, Any]
    #: One line saying what was found (set by the checks whose result is a summary).
    summary: str | None = None


@dataclass
class CommittedPartition:
    """A partition as the lake holds it: the committed manifest and the files it names, re-read;
    findings as text naming full URIs."""

    key: str
    manifest: dict[str, Any] | None = None
    manifest_checksum: str | None = None
    tables: list[pa.Table] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    #: Files whose rows could not be trusted or read (missing, checksum mismatch, not parquet).
    unreadable: list[str] = field(default_factory=list)
    bytes_read: int = 0

    @property
    def committed(self) -> bool:
        return self.manifest is not None


def _as_committed(lake: LakeStorage, key: str, reading: PartitionReading) -> CommittedPartition:
    return CommittedPartition(
        key,
        manifest=reading.manifest,
        manifest_checksum=reading.manifest_checksum,
        tables=reading.tables,
        ids=reading.ids,
        findings=[f"{lake.uri(f['where'])}: {f['detail']}" for f in reading.findings],
        unreadable=[lake.uri(where) for where in reading.unreadable],
        bytes_read=reading.bytes_read,
    )


def read_committed(lake: LakeStorage, dataset: str, version_label: str, key: str) -> CommittedPartition:
    """Re-read one committed partition; `findings` lists every way it differs from its manifest
    (and that there is none)."""
    reading = read_partition(lake, dataset, version_label, key)
    part = _as_committed(lake, key, reading)
    if reading.manifest is None and not part.findings:
        part.findings.append(f"no committed manifest at {lake.uri(reading.rel)}")
    return part


def read_manifest_only(lake: LakeStorage, dataset: str, version_label: str, key: str) -> CommittedPartition:
    """The partition's committed manifest without its files (what the chain verdict needs)."""
    return _as_committed(lake, key, read_commit_point(lake, dataset, version_label, key))


def committed_keys(lake: LakeStorage, dataset: str, version_label: str) -> list[str]:
    """The keys of every partition of `dataset`/`version_label` with a commit point, sorted (a
    `_manifest.json` deeper down is none: `pcbo verify` reports it)."""
    under = f"{dataset}/{version_label}"
    found = (layout.split_manifest_path(rel) for rel in lake.find(layout.MANIFEST, under=under))
    return sorted(parts[2] for parts in found if parts is not None)


def reconciliation(part: CommittedPartition) -> Verdict:
    """Rows, ids and Merkle root of a re-read partition against its manifest and decided adds."""
    findings = list(part.findings)
    details: dict[str, Any] = {"committed": part.committed, "bytes_read": part.bytes_read}
    if part.manifest is not None:
        manifest = part.manifest
        root = merkle.root_hex(part.ids)  # ids order, uniqueness, count and root: in part.findings
        decided = (manifest.get("counts") or {}).get("add")
        if decided is not None and decided != manifest.get("recordCount"):
            findings.append(
                f"the manifest records {manifest.get('recordCount')} rows for {decided} decided adds"
            )
        details.update(
            {
                "rows_read": len(part.ids),
                "record_count": manifest.get("recordCount"),
                "merkle_root": manifest.get("merkleRoot"),
                "merkle_root_recomputed": root,
                "manifest_checksum": part.manifest_checksum,
                "partition_version": manifest.get("partitionVersion"),
            }
        )
    details["finding_count"] = len(findings)
    if findings:
        details["findings"] = findings[:MAX_LISTED]
    return Verdict(not findings, details)


def policy_violations(
    tables: Iterable[pa.Table], policies: NormalizedPolicies, existing_ids: list[str]
) -> list[dict[str, Any]]:
    """Every written row (of `tables`, one partition's) the policies would not have added: `{id, reasons}`."""
    return [v for table in tables for v in violations(table, policies, existing_ids)]


def compliance(part: CommittedPartition, policies: NormalizedPolicies, existing_ids: list[str]) -> Verdict:
    """No row of a re-read partition breaks `policies` or is an existing target id, and every file
    could be read."""
    found = policy_violations(part.tables, policies, existing_ids)
    unreadable = part.unreadable
    details: dict[str, Any] = {
        "committed": part.committed,
        "rows_checked": sum(t.num_rows for t in part.tables),
        "violation_count": len(found),
    }
    if part.manifest is not None:
        details["committed_under_configured_policies"] = part.manifest.get("policies") == policies.to_json()
    if found:
        details["violations"] = found[:MAX_LISTED]
    if unreadable:
        details["unreadable"] = unreadable[:MAX_LISTED]
    return Verdict(not found and not unreadable, details)


@dataclass
class CheckedChain:
    """A dataset's audit chain as read, verified and replayed once (for the verdicts of many
    partitions)."""

    findings: list[str]
    replayed: ChainState
    length: int
    head: str | None
    #: the events as read (for checks that need them again: the stored log's, `gc`'s)
    events: list[dict] = field(default_factory=list)


def read_chain(env: Environment, dataset: str, version_label: str) -> CheckedChain:
    """The dataset's chain from the local backup, verified offline against the catalog's head and
    replayed (`core/chain_state.py`)."""
    key = chain_key(dataset, version_label)
    return check_chain(env.audit.backup, key, env.catalog.chain_heads().get(key))


def read_verified_chain(
    backup: ChainBackup, key: str, expected_head: tuple[int, str] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Chain `key` from `backup` and what is wrong with it: the backup's read problems and every hash
    and link recomputed offline (against `expected_head`, the catalog's, when given)."""
    events, problems = backup.read_chain_with_problems(key)
    return events, list(problems) + verify_chain(events, key, expected_head=expected_head)


def check_chain(backup: ChainBackup, key: str, expected_head: tuple[int, str] | None) -> CheckedChain:
    """Chain `key` from `backup`, verified offline (`read_verified_chain`) and replayed."""
    events, findings = read_verified_chain(backup, key, expected_head)
    replayed = replay(events)
    head = events[-1].get("chain", {}).get("event_hash") if events else None
    return CheckedChain(findings + replayed.findings, replayed, len(events), head, events)


def read_distrusted_chain(env: Environment, dataset: str, version_label: str) -> CheckedChain:
    """`read_chain` with `distrusted`'s findings too (the chain the `audit_chain` check reads, and any
    reader that decides from it without a lock): one re-hashed in the backup and the catalog alike, or
    holding an event the operator's key should have signed, has findings and vouches for nothing."""
    chain = read_chain(env, dataset, version_label)
    if not chain.findings:
        chain.findings += distrusted(env, chain, chain_key(dataset, version_label))
    return chain


class ChainNotVerified(IntegrityError):
    """A decision was asked of a chain that does not verify (exit 1): nothing was written."""


def distrusted(env: Environment, chain: CheckedChain, key: str) -> list[str]:
    """Why no decision may rest on `chain` (empty: none): its own findings (`check_chain`), else the
    findings saying it is not the history its stored transparency log and checkpoints hold (a chain
    re-hashed in the backup and the catalog alike verifies, but not against these)."""
    return chain.findings or [f["detail"] for f in other_history(env, key, chain.events)]


def verified_chain(
    env: Environment,
    dataset: str,
    version_label: str,
    doing: str,
    sync: bool = True,
    keyless_writer: bool = False,
) -> CheckedChain:
    """The chain a decision that writes, heals, restores or proves may read: with `sync` (under the
    dataset's lock) the backup and the catalog reconciled first (`AuditLog.sync_to_catalog`: a crashed
    append completed, or `ChainDivergence`); then `read_chain` (every hash and link recomputed, the
    catalog's head, the replay; without `sync`, for a reader holding no lock, the catalog's head must
    be an event of the chain, which may go on) and `distrusted`. The stores' heads agreeing says
    nothing of an event edited before the head, which would have the decision restore, heal or prove
    what no run wrote: such a chain raises `ChainNotVerified` naming it and `doing` (nothing written;
    `pcbo verify` reports every finding). Costs one read, one JCS hash of every event for the chain
    and one for its log (about 0.1 ms an event). With `sync` the writer must hold the chain's key
    (`refuse_writer_without_the_chains_key`); `keyless_writer`: or none at all (an approval, whose
    approver's key signs it)."""
    key = chain_key(dataset, version_label)
    if sync:
        env.audit.sync_to_catalog(key)
        chain = read_chain(env, dataset, version_label)
    else:
        # Without the lock a run may be appending: the catalog's head, read first (an append writes
        # the backup first), must be an event of the chain read after it
        head = env.catalog.chain_heads().get(key)
        chain = check_chain(env.audit.backup, key, None)
        if head is not None and (
            chain.length <= head[0] or chain.events[head[0]].get("chain", {}).get("event_hash") != head[1]
        ):
            chain.findings.append(f"the catalog's head (seq {head[0]}) is not an event of the chain")
    findings = distrusted(env, chain, key)
    if findings:
        raise ChainNotVerified(
            f"{doing} refused: the audit chain {key} does not verify: {'; '.join(findings[:3])}; nothing "
            "was written (`pcbo verify` lists every finding)"
        )
    if sync and not (keyless_writer and env.operator_verifier is None):
        refuse_writer_without_the_chains_key(env, chain.events, key, doing)
    return chain


def refuse_writer_without_the_chains_key(
    env: Environment, events: Sequence[Mapping[str, Any]], key: str, doing: str
) -> None:
    """A writer appends nothing to a chain (of `events`) the operator's key signs unless it holds that
    key (`core/operator_signatures.writer_refusal`): `ChainNotVerified` naming `PCBO_SIGNING_KEY` (exit
    1, nothing written), for a host, worker or server not given the key, or given another."""
    reason = writer_refusal(events, env.operator_verifier)
    if reason is not None:
        raise ChainNotVerified(f"{doing} refused: the audit chain {key}: {reason}; nothing was written")


def chain_verdict(part: CommittedPartition, chain: CheckedChain) -> Verdict:
    """The chain verifies, and the partition's commit point is the version the chain says is current
    (a commit point the chain never committed, or an older one, fails)."""
    findings = list(chain.findings)
    details: dict[str, Any] = {"chain_length": chain.length, "chain_head": chain.head or "none"}
    history = chain.replayed.get(part.key)
    current = history.current_version if history is not None else None
    if part.manifest is not None:
        if current is None or current.manifest_checksum != part.manifest_checksum:
            findings.append(
                f"the commit point {part.manifest_checksum} is not the version the audit chain says "
                "is current"
            )
        else:
            details["event_hash"] = current.event_hash
            details["event_seq"] = current.event["chain"]["seq"]
            if current.event.get("merkle_root") != part.manifest.get("merkleRoot"):
                findings.append("the commit event's Merkle root differs from the manifest's")
    else:
        details["committed"] = False
        if current is not None:
            findings.append(f"the audit chain says version {current.version} is committed; the lake has none")
    details["finding_count"] = len(findings)
    if findings:
        details["findings"] = findings[:MAX_LISTED]
    return Verdict(not findings, details)


def reading_chain_findings(key: str, reading: PartitionReading, chain: CheckedChain) -> list[str]:
    """`chain_verdict`'s findings for partition `key` as `read_partition` read it (empty: its commit
    point is the version the chain says is current, and the chain verifies)."""
    part = CommittedPartition(key, manifest=reading.manifest, manifest_checksum=reading.manifest_checksum)
    return list(chain_verdict(part, chain).details.get("findings", []))


def coverage(chain: CheckedChain, lake_keys: list[str], keys: list[str]) -> Verdict:
    """The partitions `chain` (`read_chain`, with `distrusted`'s findings) says are committed vs `keys`
    (in order) up to the last of them: gaps fail. The lake's commit points (`lake_keys`) are compared
    against the chain, never counted: one the chain does not hold as current (a commit point written
    by hand) fills no gap and fails, as does a committed partition the lake lacks, and a chain that
    does not verify vouches for nothing."""
    committed = {k for k, history in chain.replayed.partitions.items() if history.current is not None}
    in_lake = set(lake_keys)
    positions = [i for i, key in enumerate(keys) if key in committed]
    last = positions[-1] if positions else -1
    gaps = [key for key in keys[: last + 1] if key not in committed]
    uncommitted = sorted(in_lake - committed)
    missing = sorted(committed - in_lake)
    details: dict[str, Any] = {
        "partitions": len(keys),
        "committed": len(positions),
        "gaps": len(gaps),
        "not_yet_materialized": len(keys) - last - 1,
        "unknown_committed_keys": len(committed) - len(positions),
    }
    if positions:
        details["last_committed"] = keys[last]
    if gaps:
        details["first_gaps"] = gaps[:MAX_LISTED]
    if uncommitted:
        details["uncommitted_in_lake"] = uncommitted[:MAX_LISTED]
    if missing:
        details["missing_from_lake"] = missing[:MAX_LISTED]
    if chain.findings:
        details["chain_findings"] = chain.findings[:MAX_LISTED]
    problems = [
        *([f"{len(gaps)} gap(s) up to {keys[last]}"] if gaps else []),
        *(
            [f"{len(uncommitted)} commit point(s) in the lake the chain never committed"]
            if uncommitted
            else []
        ),
        *([f"{len(missing)} committed partition(s) missing from the lake"] if missing else []),
        *(["the audit chain does not verify"] if chain.findings else []),
    ]
    if problems:
        summary = "; ".join(problems)
    elif not positions:
        summary = "nothing committed yet"
    else:
        summary = f"no gaps up to {keys[last]}; {len(keys) - last - 1} partition(s) after it"
    return Verdict(not problems, details, summary)
