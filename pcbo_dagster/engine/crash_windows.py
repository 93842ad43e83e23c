"""A partition's commit point against what its audit chain says, and the only differences that heal.

The lake, the catalog and the audit backup may be written by someone who wants a forged history to
pass, so a difference between a partition's commit point (`_manifest.json`) and the chain's current
version is healed only where the commit protocol itself can leave one (CONTRACT section 4):

- **an interrupted commit**: the chain holds a `partition_commit_intent` naming exactly the manifest
  the lake now commits (its checksum and version), replacing exactly the version the chain says is
  current, and no completion after it: a crash came between the commit point and its event. Healed
  by appending the `partition_committed` event the commit would have appended.
- **an interrupted rollback**: the chain holds a `partition_rollback_intent` undoing the chain's
  current version, and the lake already commits the version it restores (or no version, when it
  restores none). Healed by appending the `partition_rolled_back` event.

Every other difference is a finding that nothing heals: a forged or copied manifest, a downgrade to
an older version, a deleted commit point or partition, a version that was rolled back but is visible
again, a manifest naming another partition. `compare` classifies; `heal` appends the missing event
and the catalog rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

from pcbo_dagster.core.chain_state import (
    PARTITION_COMMITTED,
    PARTITION_ROLLED_BACK,
    ChainState,
    CommitIntent,
    PartitionHistory,
    RollbackIntent,
)
from pcbo_dagster.core.errors import IntegrityError
from pcbo_dagster.engine.events import catalog_row, commit_body, rollback_body
from pcbo_dagster.lake import layout, manifests
from pcbo_dagster.lake.manifests import Manifest

Verdict = Literal["agrees", "heal_commit", "heal_rollback", "finding"]


class LakeDisagreesWithChain(IntegrityError):
    """A partition's commit point is not what its audit chain says, and no crash explains it."""

    def __init__(self, comparison: LakeVsChain) -> None:
        self.comparison = comparison
        super().__init__(
            f"partition {comparison.where} disagrees with its audit chain: {comparison.detail}; nothing "
            "was written to it. Run `pcbo verify` for the findings: this is not a crash `verify --repair` "
            "heals"
        )


@dataclass(frozen=True)
class LakeVsChain:
    """How one partition's commit point compares with its chain (see the module doc)."""

    where: str
    verdict: Verdict
    kind: str | None
    detail: str
    manifest: Manifest | None
    manifest_checksum: str | None
    intent: CommitIntent | RollbackIntent | None = None

    @property
    def healable(self) -> bool:
        return self.verdict in ("heal_commit", "heal_rollback")

    def finding(self) -> dict[str, Any]:
        return {"kind": self.kind, "where": self.where, "detail": self.detail}


def _identity_problem(manifest: Any, dataset: str, version_label: str, key: str) -> str | None:
    """Why a decoded manifest cannot be this partition's, or None."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return "it is not a pcbo manifest"
    part = manifest.get("partition")
    named = (
        manifest.get("dataset"),
        manifest.get("versionLabel"),
        part.get("key") if isinstance(part, dict) else None,
    )
    if named != (dataset, version_label, key):
        return "it is the manifest of {}/{}/{}, not of this partition".format(*named)
    if not isinstance(manifest.get("partitionVersion"), int) or isinstance(
        manifest["partitionVersion"], bool
    ):
        return "its partitionVersion is not an integer"
    return None


def compare(
    history: PartitionHistory | None,
    dataset: str,
    version_label: str,
    key: str,
    manifest_bytes: bytes | None,
) -> LakeVsChain:
    """Compare a partition's commit point (`manifest_bytes`, None when there is none) with its chain
    history (None when the chain never named the partition)."""
    where = f"{dataset}/{version_label}/{key}"
    expected = history.current_checksum if history is not None else None
    current = history.current if history is not None else None
    manifest: Manifest | None = None
    checksum: str | None = None
    if manifest_bytes is not None:
        checksum = manifests.checksum(manifest_bytes)
        try:
            decoded = manifests.decode(manifest_bytes)
        except ValueError:
            decoded = None
        problem = _identity_problem(decoded, dataset, version_label, key)
        if problem is not None:
            return LakeVsChain(
                where,
                "finding",
                "manifest_misplaced",
                f"the commit point cannot be this partition's: {problem}",
                None,
                checksum,
            )
        manifest = cast(Manifest, decoded)
    if checksum == expected:
        if manifest is not None and manifest["partitionVersion"] != current:
            return LakeVsChain(
                where,
                "finding",
                "manifest_version_mismatch",
                f"the commit point says version {manifest['partitionVersion']}, the chain version {current}",
                manifest,
                checksum,
            )
        return LakeVsChain(
            where, "agrees", None, "the commit point is the chain's current version", manifest, checksum
        )

    intent = history.open_intent if history is not None else None
    if (
        isinstance(intent, CommitIntent)
        and manifest is not None
        and checksum == intent.manifest_checksum
        and expected == intent.previous_manifest_checksum
        and manifest["partitionVersion"] == intent.version
        and manifest.get("previousManifestChecksum") == expected
    ):
        return LakeVsChain(
            where,
            "heal_commit",
            None,
            f"version {intent.version} was committed and the run stopped before its audit event",
            manifest,
            checksum,
            intent,
        )
    if (
        isinstance(intent, RollbackIntent)
        and expected == intent.manifest_checksum
        and checksum == intent.restore_manifest_checksum
    ):
        return LakeVsChain(
            where,
            "heal_rollback",
            None,
            f"the rollback of version {intent.version} moved the commit point and stopped before its event",
            manifest,
            checksum,
            intent,
        )

    if checksum is None:
        kind, detail = (
            "commit_point_missing",
            (
                f"the chain says version {current} ({expected}) is committed; the lake has no commit point "
                "(a deleted manifest or partition)"
            ),
        )
    elif history is not None and history.commits_of(checksum):
        older = history.commits_of(checksum)[0].version
        if expected is None or current is None or older > current:
            kind, detail = (
                "rolled_back_version_visible",
                f"the commit point is version {older}, which the chain says was rolled back "
                f"(current: {current if current is not None else 'none'})",
            )
        else:
            kind, detail = (
                "commit_point_downgraded",
                (f"the commit point is version {older}; the chain says version {current} is current"),
            )
    else:
        kind, detail = (
            "commit_point_not_on_chain",
            (
                f"the commit point {checksum} is no version the chain ever committed"
                + (f" (the chain's current version is {current})" if current is not None else "")
            ),
        )
    return LakeVsChain(where, "finding", kind, detail, manifest, checksum, intent)


def heal(env: Any, state: ChainState, dataset: str, version_label: str, comparison: LakeVsChain) -> dict:
    """Complete what a crash interrupted: append the event an interrupted commit or rollback left out
    (replayed into `state`) and the catalog rows it would have written; returns the event. Refuses
    (`ValueError`) anything `compare` did not find healable, and (`ChainMoved`, nothing appended) when
    another writer appended a lake event since `state` was replayed: a run frozen past its lease, or
    repair and a run, healing the same window would otherwise commit it twice."""
    history = state.partitions[comparison.where.rsplit("/", 1)[-1]]
    ckey = f"{dataset}/{version_label}"
    if comparison.verdict == "heal_commit":
        assert comparison.manifest is not None and comparison.manifest_checksum is not None
        event = env.audit.append(
            ckey,
            PARTITION_COMMITTED,
            commit_body(comparison.manifest, comparison.manifest_checksum, env.lake),
            fence=state,  # on the chain `comparison` was judged from (ChainMoved: another writer healed it)
        )
        state.add(event)
        env.catalog.record_partition_version(
            **catalog_row(
                comparison.manifest, comparison.manifest_checksum, env.lake, event["chain"]["event_hash"]
            )
        )
        return event
    if comparison.verdict != "heal_rollback":
        raise ValueError(f"{comparison.where}: not a crash window: {comparison.detail}")
    intent = comparison.intent
    assert isinstance(intent, RollbackIntent)
    undone = history.versions[intent.version]
    # what is left to remove, read and checked before the event: a link at or on the way to one of
    # those files refuses the completion with nothing appended or removed
    remove = _undone_files(env, history, dataset, version_label, intent.version, intent.restore_version)
    env.lake.refuse_links(remove)
    event = env.audit.append(
        ckey,
        PARTITION_ROLLED_BACK,
        rollback_body(
            dict(undone.event["partition"]),
            intent.manifest_checksum,
            intent.restore_version,
            intent.restore_manifest_checksum,
            intent.reason or "interrupted_rollback_completed",
            intent.run_id,
        ),
        fence=state,
    )
    state.add(event)
    for rel in remove:
        env.lake.delete(rel)
    catalog_rolled_back(env, history, dataset, version_label, intent.version, intent.restore_version)
    return event


def _undone_files(
    env: Any, history: PartitionHistory, dataset: str, version_label: str, undone: int, restored: int | None
) -> list[str]:
    """What an interrupted rollback has left to remove: the data files only the undone version used
    (read from the version manifests the chain committed, every path inside the partition), sorted."""

    def files(version: int | None) -> set[str]:
        if version is None or version not in history.versions:
            return set()
        data = env.lake.read_if_exists(layout.version_manifest(dataset, version_label, history.key, version))
        if data is None or manifests.checksum(data) != history.versions[version].manifest_checksum:
            return set()
        return {
            layout.data_file_path(dataset, version_label, history.key, f.get("path"))
            for f in manifests.decode(data)["files"]
        }

    keep = files(restored) | lineage_files(history, dataset, version_label, restored)
    return sorted(files(undone) - keep)


def lineage_files(
    history: PartitionHistory, dataset: str, version_label: str, restored: int | None
) -> set[str]:
    """The data files (lake-relative) of the version a rollback restores and of every version it
    replaced, by their commit events: a later rollback could make any of them current, so undoing a
    version never removes one of them, even when the undone version's rollback manifest lists it (its
    content came back in a later version under the same name)."""
    directory = layout.partition_dir(dataset, version_label, history.key)
    return {
        f"{directory}/{name}"
        for version in history.lineage(restored)
        for name in history.committed_file_names(version)
    }


def catalog_lag(env: Any, state: ChainState, dataset: str, version_label: str) -> dict[str, int]:
    """The catalog step a crash cut off after a rollback's events: key -> the undone version, for each
    partition whose last chain event is a rollback while the catalog still holds the undone version as
    committed."""
    lagging = {}
    rows = env.catalog.current_partitions(dataset, version_label)
    for key, history in sorted(state.partitions.items()):
        event = history.last_event
        if history.last_word != "rolled_back" or event is None:
            continue
        undone = event["partition"]["version"]
        row = rows.get(key)
        if row is not None and row["version"] == undone:
            lagging[key] = undone
    return lagging


def heal_catalog_lag(env: Any, state: ChainState, dataset: str, version_label: str) -> list[str]:
    """Mark each partition of `catalog_lag` as the chain says. Returns the keys marked. (Nothing else
    in the catalog is changed: other differences are findings.)"""
    lagging = catalog_lag(env, state, dataset, version_label)
    for key, undone in lagging.items():
        history = state.partitions[key]
        catalog_rolled_back(env, history, dataset, version_label, undone, history.current)
    return list(lagging)


def catalog_rolled_back(
    env: Any, history: PartitionHistory, dataset: str, version_label: str, version: int, restored: int | None
) -> None:
    """Mark `version` rolled back (and `restored` committed) in the catalog, first recording either
    version from the chain when a crash left its row out."""
    known = {
        r["version"]
        for r in env.catalog.partition_versions(dataset, version_label)
        if r["partition_key"] == history.key
    }
    for v in (version, restored):
        if v is not None and v not in known:
            record_version_from_chain(env, history, dataset, version_label, v)
    env.catalog.mark_partition_rolled_back(
        dataset=dataset,
        version_label=version_label,
        partition_key=history.key,
        version=version,
        restored_version=restored,
    )


def record_version_from_chain(
    env: Any, history: PartitionHistory, dataset: str, version_label: str, version: int
) -> None:
    """The catalog row of a committed version, from its version manifest (which must have the checksum
    its commit event names: `ValueError` otherwise) and its event."""
    committed = history.versions[version]
    data = env.lake.read_if_exists(layout.version_manifest(dataset, version_label, history.key, version))
    if data is None or manifests.checksum(data) != committed.manifest_checksum:
        raise ValueError(
            f"{dataset}/{version_label}/{history.key}: version {version}'s manifest is missing or not the "
            "one the chain committed"
        )
    env.catalog.record_partition_version(
        **catalog_row(
            manifests.decode_manifest(data), committed.manifest_checksum, env.lake, committed.event_hash
        )
    )
