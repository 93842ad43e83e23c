"""`gc`: remove the files a crash left in the lake that nothing can ever use.

A crash before a partition's commit point leaves its new data file and its version and rollback
manifests behind, named by no commit point (readers and `verify` ignore them; the next run of the
same request rewrites them). `gc` removes, per partition `<dataset>/<versionLabel>/<key>/`:

- `_versions/vN.json` and `_rollback/vN.json` of a version N newer than the committed one (0 when
  nothing is committed) that no audit event and no catalog row names, its manifest naming a run of
  this catalog: never committed;
- `part-*.parquet` files named by no kept version manifest, not by the commit point, not by any
  audit event's tables and not by any catalog row;
- `.tmp-*` files (a local rename that never happened).

A version no audit event and no catalog row names is a crash's leftover only when its version
manifest names a run of this catalog's dataset version (run id and plan hash: a crash's leftovers
do); one naming another run is kept (with the data files it names) and reported: a lake another home
wrote (`--lake`, a lake two catalogs share, staging and production running the same requests) holds
versions that home committed and rolled back, named only by its own chain.

Conservative: anything a committed manifest, a previous (restorable) version, an audit event or the
catalog refers to stays. What is removable is judged only against a chain that verifies (every line
read, every hash and link recomputed, its head the catalog's: `partition_checks.read_chain`; and the
catalog's stored transparency log and every checkpoint of it, which must hold this history): one that
does not is skipped whole, nothing of it removed, since its events can no longer say what was
committed; a partition whose commit point disagrees with that chain (other than a crash window the
chain's open intent names: `crash_windows.compare`) is skipped too, as is one whose commit point or a
version manifest cannot be read, and a symbolic link at a name gc would remove (neither the link nor
its target is touched); all are reported, and files of any other shape are left alone. Runs under
each dataset version's write lock, so it never races an execute or rollback; and, since a gc frozen
past its lease (a GC pause, a suspended VM) may wake after another host's run took the lease over and
staged or committed a new version under the very names it judged a crash's leftovers, it proves before
each partition's removals that it still holds the lease (`DatasetLease.renew`) and that no writer
changed the lake's partitions on the chain since it read it (`AuditLog.check_fence`), else stops there
(exit 1, naming the partition; nothing more removed); and removes each file only while it still holds
the bytes read when it was judged (`LakeStorage.swap(rel, None, judged)`: a gc frozen again between
that check and a removal stops at the first file another writer replaced since).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from pcbo_dagster.audit.log import ChainMoved
from pcbo_dagster.core.chain_state import ChainState
from pcbo_dagster.engine import failpoints
from pcbo_dagster.engine.crash_windows import compare
from pcbo_dagster.engine.environment import DatasetBusy, DatasetLease, Environment
from pcbo_dagster.engine.events import chain_key
from pcbo_dagster.engine.partition_checks import distrusted, read_chain
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.lake import layout, manifests
from pcbo_dagster.lake.layout import OutsidePartition

# ASCII digits only: `\d` takes any script's digits (`v٩.json` is no file of pcbo's, left alone)
_VERSION_FILE = re.compile(r"_(versions|rollback)/v([0-9]+)\.json")
_DATA_FILE = re.compile(r"part-[0-9a-f]+\.parquet")


def _partition_plan(
    env: Environment,
    pdir: str,
    files: list[str],
    event_versions: set[int],
    event_files: set[str],
    catalog_versions: set[int],
    catalog_files: set[str],
    runs: set[tuple[str, str]],
) -> tuple[list[dict[str, Any]], list[str], str | None]:
    """(removable files with their reasons, version manifests of other runs kept, skip reason) of one
    partition directory. A manifest listed but not there (an object store lists a "directory marker",
    a key ending in `/`, as the name before it) is unreadable, as one that is no manifest is."""
    names = {rel[len(pdir) + 1 :]: rel for rel in files}
    committed = 0
    keep_data: set[str] = set(event_files) | set(catalog_files)
    if layout.MANIFEST in names:
        try:
            current = manifests.decode(env.lake.read(names[layout.MANIFEST]))
            committed = int(current["partitionVersion"])
            keep_data.update(f["path"] for f in current["files"])
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            return [], [], "the commit point is unreadable"
    removable: list[dict[str, Any]] = []
    kept_versions: dict[int, str] = {}
    others: dict[str, str] = {}  # uncommitted versions another run's manifest names: digits -> path
    for name, rel in names.items():
        m = _VERSION_FILE.fullmatch(name)
        if m is None or m.group(1) != "versions":
            continue
        version = int(m.group(2))
        if version > committed and version not in event_versions and version not in catalog_versions:
            try:
                manifest = manifests.decode(env.lake.read(rel))
                ours = (manifest["runId"], manifest["planHash"]) in runs
            except (ValueError, KeyError, TypeError, FileNotFoundError):
                return [], [], f"version manifest {rel} is unreadable"
            if ours:
                continue
            others[m.group(2)] = rel
        kept_versions[version] = rel
    for name, rel in names.items():
        m = _VERSION_FILE.fullmatch(name)
        if m is None or m.group(2) in others:
            continue
        version = int(m.group(2))
        if version > committed and version not in event_versions and version not in catalog_versions:
            removable.append({"path": rel, "reason": "uncommitted_version"})
    for _version, rel in sorted(kept_versions.items()):
        try:
            manifest = manifests.decode(env.lake.read(rel))
            keep_data.update(f["path"] for f in manifest["files"])
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            return [], [], f"version manifest {rel} is unreadable"
    for name, rel in names.items():
        if _DATA_FILE.fullmatch(name) and rel not in keep_data:
            removable.append({"path": rel, "reason": "unreferenced_data_file"})
        elif name.rsplit("/", 1)[-1].startswith(".tmp-"):
            removable.append({"path": rel, "reason": "temporary_file"})
    return sorted(removable, key=lambda r: r["path"]), sorted(others.values()), None


def _disagreement(
    env: Environment, state: ChainState, dataset: str, version_label: str, key: str
) -> str | None:
    """Why the partition's commit point is not one the verified chain accounts for (its current
    version, or a crash window its open intent names), or None."""
    try:
        data = env.lake.read_if_exists(layout.manifest(dataset, version_label, key))
    except OutsidePartition:
        return "the commit point is a symbolic link"
    comparison = compare(state.get(key), dataset, version_label, key, data)
    if comparison.verdict == "finding":
        return f"the commit point disagrees with the audit chain ({comparison.kind})"
    return None


def _still_judged(
    env: Environment, lease: DatasetLease, ckey: str, state: ChainState, pdir: str, removed: int
) -> None:
    """Right before a partition's removals: the lease is still gc's and no writer changed the lake's
    partitions on the chain gc judged from, else `DatasetBusy` or `ChainMoved` naming the partition.
    Both: the lease alone cannot tell once the new holder gave it back (renewed, it is gc's again)."""
    stopped = (
        f"gc stopped before removing anything of {pdir}: nothing more was removed ({removed} removed before)"
    )
    try:
        lease.renew()
    except DatasetBusy as exc:
        raise DatasetBusy(f"{exc} (is another run staging in {pdir}?); {stopped}") from exc
    env.audit.check_fence(ckey, state, stopped)


def collect_garbage(env: Environment, dry_run: bool = False) -> dict[str, Any]:
    by_dataset: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for rel in env.lake.list_files():
        parts = rel.split("/")
        if len(parts) < 4 or parts[0].startswith("_"):
            continue  # not inside a partition directory (`_iceberg/`: table metadata): not ours to judge
        try:
            layout.check_partition(*parts[:3])
        except OutsidePartition:
            # not a partition (`<dataset>/<versionLabel>/_checkpoints/`, whose notes are written after a
            # run's lock is released: a `.tmp-*` there may be one being written): not ours to judge
            continue
        by_dataset[(parts[0], parts[1])][layout.partition_dir(*parts[:3])].append(rel)

    removed: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    partitions_checked = 0
    for (dataset, version_label), partitions in sorted(by_dataset.items()):
        ckey = chain_key(dataset, version_label)
        with env.dataset_lock(dataset, version_label, create=not dry_run) as lease:
            # What was committed is read from a chain that verifies, never from the backup as it lies
            # (lines taken out or edited, with the catalog's rows and the lake's commit point to match,
            # made a committed version's files look like a crash's leftovers)
            chain = read_chain(env, dataset, version_label)
            # as `verify` checks it: a chain re-hashed in both stores is not the one its stored
            # transparency log and checkpoints hold (a note that cannot be read says nothing of it)
            if distrusted(env, chain, ckey):
                skipped.append({"where": ckey, "reason": "the audit chain does not verify"})
                continue
            if not chain.replayed.partitions and not env.catalog.runs(dataset, version_label):
                # Not this catalog's: a crash's leftovers come with their run's row (written before
                # anything is staged); with neither, a rolled-back partition's kept versions (another
                # home's history: `--lake` naming its lake) would look like a crash's
                skipped.append(
                    {
                        "where": ckey,
                        "reason": "no run of this dataset version is in the catalog or on its chain",
                    }
                )
                continue
            event_versions: dict[str, set[int]] = defaultdict(set)
            event_files: dict[str, set[str]] = defaultdict(set)
            for key, history in chain.replayed.partitions.items():
                for event in history.events:
                    part = event.get("partition")
                    if not isinstance(part, dict):
                        continue
                    if isinstance(part.get("version"), int):
                        event_versions[key].add(part["version"])
                    tables = event.get("tables")
                    for name in tables if isinstance(tables, dict) else ():
                        event_files[key].add(f"{layout.partition_dir(dataset, version_label, key)}/{name}")
            catalog_versions: dict[str, set[int]] = defaultdict(set)
            catalog_files: dict[str, set[str]] = defaultdict(set)
            try:
                rows = env.catalog.partition_versions(dataset, version_label)
            except (ValueError, TypeError, KeyError, RecursionError):
                skipped.append({"where": ckey, "reason": "the catalog's partition rows are unreadable"})
                continue
            for row in rows:
                if type(row["version"]) is not int:
                    continue  # not a version pcbo wrote: nothing it names is kept, nothing removed for it
                catalog_versions[row["partition_key"]].add(row["version"])
                listed = row["files"] if isinstance(row["files"], list) else []
                catalog_files[row["partition_key"]].update(
                    f["path"] for f in listed if isinstance(f, dict) and isinstance(f.get("path"), str)
                )
            try:
                runs = {(r["run_id"], r["plan_hash"]) for r in env.catalog.runs(dataset, version_label)}
            except (ValueError, TypeError, KeyError, RecursionError):
                skipped.append({"where": ckey, "reason": "the catalog's run rows are unreadable"})
                continue
            for index, (pdir, files) in enumerate(sorted(partitions.items())):
                key = pdir.rsplit("/", 1)[-1]
                partitions_checked += 1
                disagreement = _disagreement(env, chain.replayed, dataset, version_label, key)
                if disagreement is not None:
                    skipped.append({"where": pdir, "reason": disagreement})
                    continue
                removable, others, skip = _partition_plan(
                    env,
                    pdir,
                    files,
                    event_versions[key],
                    event_files[key],
                    catalog_versions[key],
                    catalog_files[key],
                    runs,
                )
                if skip is not None:
                    skipped.append({"where": pdir, "reason": skip})
                    continue
                skipped.extend(
                    {"where": rel, "reason": "a version no run of this catalog wrote (another home's?): kept"}
                    for rel in others
                )
                kept = []
                for entry in removable:
                    if not env.lake.inside(entry["path"]):
                        # a symbolic link planted at a garbage name: neither it nor its target is
                        # touched, and the rest of the lake is still collected
                        skipped.append({"where": entry["path"], "reason": "a symbolic link: left alone"})
                        continue
                    kept.append(entry)
                if dry_run:
                    removed.extend({**e, "uri": redact_url(env.lake.uri(e["path"]))} for e in kept)
                    continue
                # the bytes judged removable: each file is removed only while it still holds them
                judged = {entry["path"]: env.lake.read_if_exists(entry["path"]) for entry in kept}
                if kept:
                    failpoints.reached("gc_before_removals", index)
                    _still_judged(env, lease, ckey, chain.replayed, pdir, len(removed))
                    failpoints.reached("gc_after_fence_check", index)
                for entry in kept:
                    held = judged[entry["path"]]
                    if held is None:
                        continue  # gone since it was listed: nothing to remove
                    if not env.lake.swap(entry["path"], None, held):
                        raise ChainMoved(
                            f"{redact_url(env.lake.uri(entry['path']))} no longer holds what gc judged "
                            "removable (another writer's since: was gc's write lease taken over?); gc "
                            f"stopped in {pdir}: nothing more was removed ({len(removed)} removed before)"
                        )
                    removed.append({**entry, "uri": redact_url(env.lake.uri(entry["path"]))})
    return {
        "status": "dry_run" if dry_run else ("removed" if removed else "clean"),
        "dryRun": dry_run,
        "removed": removed,
        "skipped": skipped,
        "totals": {"partitions": partitions_checked, "removed": len(removed), "skipped": len(skipped)},
    }
