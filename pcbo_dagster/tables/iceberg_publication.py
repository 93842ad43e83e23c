"""Publish committed partitions to an Apache Iceberg table (issue 17), bound to the evidence.

The lake stays exactly as it is: its content-addressed parquet files are registered in the table as
they are (no rewrite), so one table names, at every snapshot, exactly the files the partitions'
commit points name, and any engine (DuckDB, Spark, Trino, Snowflake) reads it without `_manifest.json`.

**What the table must hold is derived from the audit chain**, like everything `verify` checks: per
partition, the files of the version the chain says is current (a commit event's `tables`, each a
content-addressed `part-<sha256 prefix>.parquet` of the partition's directory). `expected_files`
computes it from a replayed chain, so a snapshot never names a file no committed manifest names.

**Publication is a step after the commit point** (execute: after each commit batch's audit events and
catalog rows; rollback: after its events). It compares the table's current snapshot (of its branch)
with the chain and commits one snapshot that deletes the files no longer current and adds the new
ones: an overwrite by partition, no data rewritten. Each pcbo snapshot's summary is its own intent
record and evidence:

- `pcbo.kind`: `pcbo.publication/1`; `pcbo.chain-key`, `pcbo.branch`: the audit chain
  (`<dataset>/<versionLabel>`) and the table branch;
- `pcbo.audit-seq`, `pcbo.audit-head`: the chain position published, the seq and event hash of its
  last event (a checkpoint: every event before it is reachable through `prev_event_hash`);
- `pcbo.partitions`: JSON, per partition the snapshot changes: key, version (null: removed),
  manifest checksum, the type and hash of its last audit event, run id; `pcbo.runs`: JSON, the plan
  and decision hash of each of those runs;
- `pcbo.files-sha256`, `pcbo.file-count`: SHA-256 of the sorted lake paths of every file the table
  holds after the snapshot;
- `pcbo.run-id`, `pcbo.reason`: who published (execute, rollback, repair);
- `pcbo.approved-snapshot-id`: a promotion's approved staging snapshot.

**Crash safety** (same rule as the audit chain). A crash between the lake commit and the snapshot
leaves the table at an older pcbo snapshot: one that names a seq of this chain, holds exactly the
files the chain implied at that seq, and agrees with its own `files-sha256`. Only that state is
healed — by the next run, rollback or `verify --repair`, which publish what the chain added since.
Anything else (a file added or removed by hand, a snapshot not published by pcbo, an altered or
moved-back snapshot) is a finding (`judge`): `verify` reports it, and publication refuses to build on
it (`PublicationRefused`), never adopting the foreign file.

**Where.** A dataset version publishes to one table per branch, declared on its audit chain the first
time (a `table_publication_recorded` event: format, catalog URL without credentials, table name,
branch; with the operator's key, signed by it: `operator_signature`, `core/operator_signatures.py`, and
then only a declaration that key signed counts), then recorded in the catalog's `table_publications`,
which mirrors the chain: `verify` checks
every table the chain declares whatever the catalog says (a deleted row cannot switch the checks off;
`verify --repair` records a row the chain declares and the catalog lacks, a crash window of this
step), and a row the chain never declared is a finding (`table_publication_not_on_chain`). The
catalog: `PCBO_ICEBERG_CATALOG_URL` when the spec leaves it out, else
a pyiceberg SQL catalog on SQLite at `$PCBO_HOME/iceberg.db`; `pcbo` for the pcbo catalog's own
database (PostgreSQL in production); a `postgresql://` or `sqlite://` URL; or an `http(s)://` REST
catalog (`PCBO_ICEBERG_REST_TOKEN` / `PCBO_ICEBERG_REST_CREDENTIAL`). The table's metadata lives with
the lake, under `<lake>/_iceberg/<namespace>/<table>` (no dataset name starts with `_`).

**The chain it reads verifies.** Where a dataset version publishes and what its table is judged
against are read from the audit chain through `partition_checks.verified_chain` (every hash and link,
the catalog's head, the history its stored log and checkpoints hold) each time a publication reads it,
under the dataset's lock: a chain edited since the run, rollback or repair began is refused
(`ChainNotVerified`, exit 1) before a table is created or a snapshot published. Whether it publishes
at all is decided from the chain the run or rollback verified under that lock (`publisher_for`'s
`verified`), never from another read of the backup: a dataset version that publishes nowhere (no
table given, none declared on that chain) reads nothing more, and a declaration hidden from the
backup since is published to all the same, or the edited chain refused.

**Write-audit-publish.** A rollout's staging environment publishes to the table's `staging` branch
(its files are the staging lake's); promotion publishes production's byte-identical files to `main`
in one snapshot naming the approved staging snapshot (`pcbo.approved-snapshot-id`). `main` is
replaced rather than fast-forwarded because production's manifests name production's copies of the
files: a `main` that pointed at the staging lake would name files no production manifest names.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pcbo_dagster.catalog.publications import TablePublicationRow
from pcbo_dagster.core.canonical import prefixed, sha256_hex
from pcbo_dagster.core.chain_state import (
    PARTITION_ROLLED_BACK,
    TABLE_PUBLICATION_RECORDED,
    ChainState,
    replay,
)
from pcbo_dagster.core.errors import IntegrityError, InvalidInput, PcboError
from pcbo_dagster.core.instants import to_datetime
from pcbo_dagster.core.operator_signatures import verified_statement
from pcbo_dagster.core.request_model import TABLE_NAME_PATTERN, TableSpec
from pcbo_dagster.io.redaction import redact_url, scrub_text
from pcbo_dagster.lake import layout
from pcbo_dagster.lake.storage import LakeStorage

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table, Transaction

    from pcbo_dagster.core.plan import Plan
    from pcbo_dagster.core.signed_note import VerifierKey
    from pcbo_dagster.engine.environment import Environment

_T = TypeVar("_T")


class _StatisticsOfEmptyColumns(logging.Filter):
    """pyiceberg warns once per column of a data file whose parquet footer holds no statistics for it:
    every column of pcbo's zero-row files (an empty partition), dozens of lines a run on stderr. pcbo
    writes statistics for every column that holds a value; such a file is as it should be."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyArrow statistics missing for column")


logging.getLogger("pyiceberg.io.pyarrow").addFilter(_StatisticsOfEmptyColumns())

#: The catalog of a table spec that leaves `catalog` out.
CATALOG_ENV = "PCBO_ICEBERG_CATALOG_URL"
REST_TOKEN_ENV = "PCBO_ICEBERG_REST_TOKEN"
REST_CREDENTIAL_ENV = "PCBO_ICEBERG_REST_CREDENTIAL"
#: The embedded default catalog, under `PCBO_HOME`.
EMBEDDED_CATALOG_FILE = "iceberg.db"
#: Where new tables' metadata goes, inside the lake (no dataset is named with a leading `_`).
WAREHOUSE_DIR = "_iceberg"
MAIN_BRANCH = "main"
STAGING_BRANCH = "staging"
PUBLICATION_KIND = "pcbo.publication/1"
#: An empty first snapshot on `main`, when a table is created for a `staging` branch: pyiceberg 0.12
#: writes to another branch only once the table has a snapshot. It publishes nothing.
TABLE_CREATED_KIND = "pcbo.table-created/1"

P_KIND = "pcbo.kind"
P_CHAIN_KEY = "pcbo.chain-key"
P_BRANCH = "pcbo.branch"
P_AUDIT_SEQ = "pcbo.audit-seq"
P_AUDIT_HEAD = "pcbo.audit-head"
P_PARTITIONS = "pcbo.partitions"
P_RUNS = "pcbo.runs"
P_FILES_DIGEST = "pcbo.files-sha256"
P_FILE_COUNT = "pcbo.file-count"
P_RUN_ID = "pcbo.run-id"
P_REASON = "pcbo.reason"
P_APPROVED_SNAPSHOT = "pcbo.approved-snapshot-id"
#: Table property: the audit chain a table was created for.
TABLE_CHAIN_KEY = "pcbo.chain-key"
TABLE_LAKE = "pcbo.lake"
#: The table properties pcbo sets (`Publisher._create`); pyiceberg keeps the name mapping in step with
#: the schema.
NAME_MAPPING_PROPERTY = "schema.name-mapping.default"
PCBO_TABLE_PROPERTIES = frozenset({TABLE_CHAIN_KEY, TABLE_LAKE, NAME_MAPPING_PROPERTY})


class PublicationRefused(IntegrityError):
    """The table is in a state pcbo cannot vouch for (or cannot take a file): nothing was published.
    The lake's commits stand; `findings` say what is wrong (exit status 1); `document`, when set, is
    the document of the command that did the rest of its work (a rollback)."""

    def __init__(self, where: str, findings: list[dict[str, str]]) -> None:
        self.findings = findings
        self.document: dict[str, Any] | None = None
        text = "; ".join(f"{f['kind']}: {f['detail']}" for f in findings[:3])
        super().__init__(f"table {where}: publication refused ({text}); the lake's commits stand")


# -- where: the target -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TableTarget:
    """A resolved publication target. `catalog_url` may hold credentials (from the environment): it
    is never stored, logged or shown as it is (`public_catalog`)."""

    catalog_url: str
    name: str
    warehouse: str
    branch: str = MAIN_BRANCH
    #: A promotion: the staging snapshot approved, recorded in the snapshot it publishes.
    approved_snapshot_id: int | None = None
    #: Publish once, when the run ends, rather than after each commit batch (a promotion: `main`
    #: goes from the old state to the promoted one in one snapshot).
    one_snapshot: bool = False

    @property
    def public_catalog(self) -> str:
        return redact_url(self.catalog_url)

    def describe(self) -> dict[str, Any]:
        return {"format": "iceberg", "catalog": self.public_catalog, "name": self.name, "branch": self.branch}


def catalog_url_for(catalog: str | None, home: os.PathLike[str] | str, pcbo_catalog_url: str) -> str:
    """The catalog URL of a spec's `catalog`: left out, `PCBO_ICEBERG_CATALOG_URL` or the embedded
    SQLite catalog under `home`; `pcbo`, the pcbo catalog's database; else the URL given."""
    if catalog is None:
        return (
            os.environ.get(CATALOG_ENV) or f"sqlite:///{os.path.join(os.fspath(home), EMBEDDED_CATALOG_FILE)}"
        )
    if catalog == "pcbo":
        return pcbo_catalog_url
    return catalog


def target_for(
    spec: TableSpec,
    env: Environment,
    branch: str = MAIN_BRANCH,
    approved_snapshot_id: int | None = None,
    one_snapshot: bool = False,
) -> TableTarget:
    """The target of a table spec, resolved against `env` (its home, pcbo catalog and lake)."""
    settings = env.settings
    return TableTarget(
        catalog_url=catalog_url_for(spec.catalog, settings.home, settings.catalog_url),
        name=spec.name,
        warehouse=f"{env.lake.url}/{WAREHOUSE_DIR}",
        branch=branch,
        approved_snapshot_id=approved_snapshot_id,
        one_snapshot=one_snapshot,
    )


def staging_target(spec: TableSpec | None, production: Environment) -> TableTarget | None:
    """Write-audit-publish: a rollout's staging environment publishes to the `staging` branch of the
    dataset's table (resolved where production resolves it: one table for both stages)."""
    return None if spec is None else target_for(spec, production, branch=STAGING_BRANCH)


def promotion_target(spec: TableSpec | None, production: Environment) -> TableTarget | None:
    """Write-audit-publish: a promotion publishes production's files to `main` in one snapshot that
    names the approved staging snapshot (the `staging` branch's head)."""
    if spec is None:
        return None
    target = target_for(spec, production)
    from pyiceberg.exceptions import NoSuchTableError

    try:
        staged = load_table(production, target).metadata.snapshot_by_name(STAGING_BRANCH)
    except NoSuchTableError:
        staged = None
    return target_for(
        spec, production, approved_snapshot_id=staged.snapshot_id if staged else None, one_snapshot=True
    )


def recorded_target(row: TablePublicationRow, env: Environment) -> TableTarget:
    """The recorded target; its catalog URL with the credentials the environment holds for it (the
    record never has them). A recorded name that is not a table name as a request may give one
    (`TABLE_NAME_PATTERN`) is `IntegrityError`: the catalog is writable by whoever forges history, and
    the name becomes SQL (`pcbo query` names the table in DuckDB)."""
    if not isinstance(row["table_name"], str) or not re.fullmatch(TABLE_NAME_PATTERN, row["table_name"]):
        raise IntegrityError(
            f"the catalog's table publication of {row['dataset']}/{row['version_label']} names "
            f"{scrub_text(repr(row['table_name']))}, which is not a table name (namespace.table): not read"
        )
    url = row["catalog_url"]
    for candidate in (os.environ.get(CATALOG_ENV), env.settings.catalog_url):
        if candidate and redact_url(candidate) == url:
            url = candidate
            break
    return TableTarget(url, row["table_name"], f"{env.lake.url}/{WAREHOUSE_DIR}", row["branch"])


def verified_events(env: Environment, dataset: str, version_label: str) -> list[dict[str, Any]]:
    """The events of the dataset version's chain as a publication reads them, under the dataset's lock
    (every caller holds it): through `partition_checks.verified_chain`, `ChainNotVerified` (exit 1,
    nothing published) for a chain that does not verify."""
    from pcbo_dagster.engine.partition_checks import verified_chain

    doing = f"the table publication of {dataset}/{version_label}"
    return verified_chain(env, dataset, version_label, doing).events


def resolve_target(
    env: Environment,
    spec: TableSpec | None,
    dataset: str,
    version_label: str,
    given: TableTarget | None = None,
    chain: list[dict[str, Any]] | None = None,
) -> TableTarget | None:
    """Where `dataset/version_label` publishes: `given` (a rollout's staging or promotion target), else
    the request's `spec`, else what its chain (`chain`: its events, when already read) declares; None
    when it publishes nowhere. A dataset version publishes to one table: naming another is invalid
    input (nothing written)."""
    branch = given.branch if given is not None else MAIN_BRANCH
    # Only the chain says where a dataset version publishes: a catalog row alone (which someone who can
    # write the catalog could add) never makes a target, nor gets declared (verify reports it).
    if chain is None:
        chain = verified_events(env, dataset, version_label)
    recorded = declared_publications(chain, env.operator_verifier).get(branch)
    target = given if given is not None else (target_for(spec, env) if spec is not None else None)
    if recorded is None:
        if target is not None:
            refuse_another_datasets_table(env, target, dataset, version_label)
        return target
    if target is None:
        return recorded_target(recorded, env)
    refuse_another_table(target.public_catalog, target.name, recorded, dataset, version_label)
    return target


def refuse_another_table(
    public_catalog: str, name: str, recorded: TablePublicationRow, dataset: str, version_label: str
) -> None:
    """A dataset version publishes to one table: a request naming table `name` in `public_catalog` (its
    URL without credentials) other than the one its chain declares (`recorded`) is invalid input
    (nothing written): execute's check (`resolve_target`) and its dry-run's."""
    if (public_catalog, name) != (recorded["catalog_url"], recorded["table_name"]):
        raise InvalidInput(
            "table",
            f"{dataset}/{version_label} is published to {recorded['table_name']} in "
            f"{recorded['catalog_url']}: a dataset version publishes to one table (use a new versionLabel "
            "for another table)",
        )


def refuse_another_datasets_table(
    env: Environment, target: TableTarget, dataset: str, version_label: str
) -> None:
    """A table holds one dataset version: naming a table the catalog records for another, or one that
    exists and was created for another (its `pcbo.chain-key` property, which a deleted catalog row
    does not hide), is invalid input (nothing written). (A table that cannot be read is found when
    publishing, nothing published.) Nothing created: an embedded catalog's file that does not exist
    holds no table (opening it would create it)."""
    from pyiceberg.exceptions import NoSuchTableError

    taken = InvalidInput(  # naming neither that dataset nor the catalog (the HTTP API answers it)
        "table",
        f"{target.name} is the table of another dataset version: a table holds one dataset "
        "version (name another table)",
    )
    for row in env.catalog.table_publications():
        if (row["catalog_url"], row["table_name"]) != (target.public_catalog, target.name):
            continue
        if (row["dataset"], row["version_label"]) != (dataset, version_label):
            raise taken
    if _is_missing_sqlite_catalog(target.catalog_url):
        return
    try:
        table = load_table(env, target)
    except (NoSuchTableError, TableUnreadable):
        return
    if table.metadata.properties.get(TABLE_CHAIN_KEY) != f"{dataset}/{version_label}":
        raise taken


# -- what: the files the chain implies --------------------------------------------------------------


@dataclass(frozen=True)
class PublishedFile:
    """A data file the table must hold: a file of a partition's current version, per the chain."""

    path: str  # lake-relative
    key: str
    row_count: int
    byte_size: int
    start: str | int  # the partition's window (an instant, or a ledger sequence)
    end: str | int


def expected_files(state: ChainState, dataset: str, version_label: str) -> dict[str, PublishedFile]:
    """Every file of every partition's current version, by lake path, from a replayed chain."""
    return _version_files(state, dataset, version_label, every_version=False)


def committed_files(state: ChainState, dataset: str, version_label: str) -> dict[str, PublishedFile]:
    """Every file of every version the chain committed (current or not), by lake path."""
    return _version_files(state, dataset, version_label, every_version=True)


def _version_files(
    state: ChainState, dataset: str, version_label: str, every_version: bool
) -> dict[str, PublishedFile]:
    files: dict[str, PublishedFile] = {}
    for key, history in state.partitions.items():
        current = history.current_version
        versions = list(history.versions.values()) if every_version else [current] if current else []
        directory = layout.partition_dir(dataset, version_label, key)
        for version in versions:
            part = version.event["partition"]
            for name, table in (version.event.get("tables") or {}).items():
                path = f"{directory}/{name}"
                files[path] = PublishedFile(
                    path, key, int(table["row_count"]), int(table["byte_size"]), part["start"], part["end"]
                )
    return files


def files_digest(paths: list[str] | set[str]) -> str:
    return prefixed(sha256_hex("\n".join(sorted(paths)).encode("utf-8")))


# -- the table's state against the chain -----------------------------------------------------------


@dataclass
class TableState:
    """A branch of a table as it is: its current snapshot and the files it lists."""

    snapshot: Any  # pyiceberg Snapshot or None
    files: dict[str, DataFile]  # lake-relative path -> data file
    foreign: list[str]  # file paths outside this dataset version's lake directory
    repeated: list[str] = field(default_factory=list)  # lake-relative paths listed more than once
    #: manifests whose partition summaries in the manifest list are not their entries' (what engines
    #: prune whole manifests by)
    misleading: list[str] = field(default_factory=list)


@dataclass
class Judgement:
    """`in_sync`, `behind` (a publication a crash interrupted: healable) or `diverged` (findings)."""

    verdict: str
    findings: list[dict[str, str]] = field(default_factory=list)
    detail: str = ""


def read_state(
    table: Table,
    branch: str,
    lake_url: str,
    dataset: str,
    version_label: str,
    confine: Callable[[str], None],
) -> TableState:
    """The branch's files; its manifest list and manifests are read only where `confine` allows
    (`table_metadata_confinement`), and a failure to read them is `TableUnreadable`."""
    return read_table_metadata(lambda: _read_state(table, branch, lake_url, dataset, version_label, confine))


def _read_state(
    table: Table,
    branch: str,
    lake_url: str,
    dataset: str,
    version_label: str,
    confine: Callable[[str], None],
) -> TableState:
    from pyiceberg.manifest import ManifestEntryStatus

    snapshot = table.metadata.snapshot_by_name(branch)
    files: dict[str, DataFile] = {}
    foreign: list[str] = []
    repeated: set[str] = set()
    misleading: list[str] = []
    prefix = f"{lake_url}/{dataset}/{version_label}/"
    if snapshot is not None:
        for manifest in confined_manifests(table, snapshot, confine):
            entries = manifest.fetch_manifest_entry(table.io, discard_deleted=False)
            if not _summaries_match(table, manifest, entries):
                misleading.append(manifest.manifest_path)
            for entry in entries:
                if entry.status == ManifestEntryStatus.DELETED:
                    continue
                path = entry.data_file.file_path
                if path.startswith(prefix):
                    if path[len(lake_url) + 1 :] in files:  # every reader reads its rows twice
                        repeated.add(path[len(lake_url) + 1 :])
                    files[path[len(lake_url) + 1 :]] = entry.data_file
                else:
                    foreign.append(path)
    return TableState(snapshot, files, sorted(foreign), sorted(repeated), misleading)


def _summaries_match(table: Table, manifest: Any, entries: list[Any]) -> bool:
    """Whether the manifest list's entry of `manifest` is what its entries give, as pyiceberg writes it:
    a data manifest, its counts of added, existing and deleted files and rows, and its partition
    summaries (over every entry). Engines skip a whole manifest by them: bounds that exclude its files
    hide their rows from every filtered read, and a manifest said to have no added or existing file
    is not read at all (DuckDB's `iceberg_scan`, Iceberg's own readers)."""
    from pyiceberg.manifest import ManifestContent, ManifestEntryStatus, construct_partition_summaries

    if manifest.content != ManifestContent.DATA:
        return False
    for status, files, rows in (
        (ManifestEntryStatus.ADDED, manifest.added_files_count, manifest.added_rows_count),
        (ManifestEntryStatus.EXISTING, manifest.existing_files_count, manifest.existing_rows_count),
        (ManifestEntryStatus.DELETED, manifest.deleted_files_count, manifest.deleted_rows_count),
    ):
        these = [e for e in entries if e.status == status]
        if (files, rows) != (len(these), sum(e.data_file.record_count for e in these)):
            return False
    spec = table.specs().get(manifest.partition_spec_id)
    if spec is None:
        return False
    try:
        expected = construct_partition_summaries(
            spec, table.schema(), [e.data_file.partition for e in entries]
        )
    except (ValueError, TypeError, IndexError):
        return False
    return list(manifest.partitions or []) == expected


def confined_manifests(table: Table, snapshot: Any, confine: Callable[[str], None]) -> list[Any]:
    """The manifests of `snapshot`, its manifest list and each manifest allowed by `confine` (which
    raises) before anything reads them. The list is read from its file, every time: pyiceberg's
    `Snapshot.manifests` answers its entries from a process-wide cache keyed by each manifest's path,
    so a process that lives on (the HTTP API's `verify`, a Dagster code server) judged a manifest list
    rewritten in place (its summaries, its counts) by the entries it had read before."""
    from pyiceberg.manifest import read_manifest_list

    confine(snapshot.manifest_list)
    manifests = list(read_manifest_list(table.io.new_input(snapshot.manifest_list)))
    for manifest in manifests:
        confine(manifest.manifest_path)
    return manifests


def _matches(files: dict[str, DataFile], expected: dict[str, PublishedFile]) -> bool:
    if set(files) != set(expected):
        return False
    return all(
        (df.record_count, df.file_size_in_bytes) == (expected[p].row_count, expected[p].byte_size)
        for p, df in files.items()
    )


def _properties(snapshot: Any) -> dict[str, str]:
    return dict(snapshot.summary.additional_properties) if snapshot is not None and snapshot.summary else {}


def judge(
    table: Table,
    current: TableState,
    branch: str,
    events: list[dict[str, Any]],
    state: ChainState,
    dataset: str,
    version_label: str,
    lake: LakeStorage,
) -> Judgement:
    """The table's branch against the chain (`events`, replayed as `state`); see the module doc. Each
    listed file's entry is checked against the file in `lake` too."""
    judgement = _judge_branch(table, current, branch, events, state, dataset, version_label)
    entries = data_file_findings(lake, table, current, state, dataset, version_label)
    if entries:
        judgement = Judgement("diverged", [*judgement.findings, *entries])
    if branch == MAIN_BRANCH:
        # Readers (pyiceberg's `scan()`, DuckDB's `iceberg_scan`, Spark, Trino) read the table's current
        # snapshot, which the metadata file names apart from its `main` ref: the two must be one.
        main = current.snapshot.snapshot_id if current.snapshot is not None else None
        if table.metadata.current_snapshot_id != main:
            pointer = _finding(
                "table_current_snapshot_not_main",
                f"snapshot {table.metadata.current_snapshot_id}",
                f"the table's current snapshot, which readers read, is not its main branch's ({main})",
            )
            return Judgement("diverged", [pointer, *judgement.findings])
    return judgement


def _judge_branch(
    table: Table,
    current: TableState,
    branch: str,
    events: list[dict[str, Any]],
    state: ChainState,
    dataset: str,
    version_label: str,
) -> Judgement:
    ckey = f"{dataset}/{version_label}"
    expected = expected_files(state, dataset, version_label)
    if (
        not current.foreign
        and not current.repeated
        and not current.misleading
        and _matches(current.files, expected)
    ):
        return Judgement("in_sync")
    props = _properties(current.snapshot)
    ours = (
        props.get(P_KIND) == PUBLICATION_KIND
        and props.get(P_CHAIN_KEY) == ckey
        and props.get(P_BRANCH) == branch
    )
    findings: list[dict[str, str]] = []
    if current.snapshot is None or (props.get(P_KIND) == TABLE_CREATED_KIND and not current.files):
        earlier = [
            s
            for s in table.metadata.snapshots
            if _properties(s).get(P_BRANCH) == branch and _properties(s).get(P_KIND) == PUBLICATION_KIND
        ]
        if not earlier:  # created, never published to (a crash right after): the chain at seq -1
            if not expected:
                return Judgement("in_sync")
            return Judgement("behind", detail="the table was created but nothing was published yet")
        findings.append(
            _finding("table_branch_reset", branch, "the branch has no snapshot, yet pcbo published to it")
        )
    elif not ours:
        findings.append(
            _finding(
                "table_snapshot_not_published_by_pcbo",
                f"snapshot {current.snapshot.snapshot_id}",
                f"the current snapshot of branch {branch} carries no pcbo publication of {ckey} "
                "(written by another tool)",
            )
        )
    else:
        seq, head = props.get(P_AUDIT_SEQ, ""), props.get(P_AUDIT_HEAD)
        position = _audit_seq(props)
        on_chain = position is not None and -1 <= position < len(events)
        if on_chain and position is not None and position >= 0:
            on_chain = events[position].get("chain", {}).get("event_hash") == head
        if not on_chain:
            findings.append(
                _finding(
                    "table_snapshot_not_on_chain",
                    f"snapshot {current.snapshot.snapshot_id}",
                    f"it says it publishes {ckey} up to seq {seq} ({head}), not an event of the chain",
                )
            )
        else:
            assert position is not None
            then = expected_files(replay(events[: position + 1]), dataset, version_label)
            self_consistent = props.get(P_FILES_DIGEST) == files_digest(set(current.files))
            if (
                not current.foreign
                and not current.repeated
                and not current.misleading
                and self_consistent
                and _matches(current.files, then)
            ):
                # (A seq that is not a number is none pcbo wrote: counted as later, never healed over.)
                later = [
                    s.snapshot_id
                    for s in table.metadata.snapshots
                    if _properties(s).get(P_BRANCH) == branch
                    and _properties(s).get(P_CHAIN_KEY) == ckey
                    and P_AUDIT_SEQ in _properties(s)
                    and _later(_audit_seq(_properties(s)), position)
                ]
                if not later:
                    return Judgement(
                        "behind",
                        detail=f"the table publishes the chain up to seq {position}, "
                        f"the chain is at seq {len(events) - 1}",
                    )
                findings.append(
                    _finding(
                        "table_snapshot_downgraded",
                        f"snapshot {current.snapshot.snapshot_id}",
                        f"branch {branch} was moved back: snapshot(s) {later[:3]} published a later state",
                    )
                )
            else:
                findings.append(
                    _finding(
                        "table_snapshot_altered",
                        f"snapshot {current.snapshot.snapshot_id}",
                        "the files the snapshot lists are not the ones its pcbo properties and the chain say",
                    )
                )
    for path in sorted(set(current.files) - set(expected)) + current.foreign:
        findings.append(
            _finding(
                "table_file_not_in_manifests", path, "the table lists a file no current commit point names"
            )
        )
    for path in sorted(set(expected) - set(current.files)):
        findings.append(
            _finding("table_file_missing", path, "a file the current commit point names is not in the table")
        )
    for path in current.misleading:
        findings.append(
            _finding(
                "table_manifest_summary_mismatch",
                redact_url(path)[:300],
                "the manifest list's entry of this manifest (partition bounds, file and row counts, "
                "content) is not what the manifest holds: readers skip files the table lists by it",
            )
        )
    for path in current.repeated:
        findings.append(
            _finding(
                "table_file_listed_twice",
                path,
                "the table lists the file more than once: readers read its rows twice",
            )
        )
    for path in sorted(set(expected) & set(current.files)):
        df, want = current.files[path], expected[path]
        if (df.record_count, df.file_size_in_bytes) != (want.row_count, want.byte_size):
            findings.append(
                _finding(
                    "table_file_metadata_mismatch",
                    path,
                    f"the table says {df.record_count} rows / {df.file_size_in_bytes} bytes, the chain "
                    f"{want.row_count} / {want.byte_size}",
                )
            )
    return Judgement("diverged", findings)


def _audit_seq(props: dict[str, str]) -> int | None:
    """A snapshot's `pcbo.audit-seq` (None when it is not an integer as pcbo writes it)."""
    seq = props.get(P_AUDIT_SEQ, "")
    return int(seq) if re.fullmatch(r"-?[0-9]{1,18}", seq) else None


def _later(seq: int | None, position: int) -> bool:
    return seq is None or seq > position


def _finding(kind: str, where: str, detail: str) -> dict[str, str]:
    return {"kind": kind, "where": where, "detail": detail}


# -- the catalog and the table ---------------------------------------------------------------------


def open_catalog(url: str, confine: Callable[[str], None] | None = None) -> Catalog:
    """A pyiceberg catalog: REST for `http(s)://`, else the SQL catalog (SQLite, PostgreSQL through
    psycopg 3). `confine`: called with each table metadata file's location before it is read (it raises
    to refuse it; `table_metadata_confinement`)."""
    catalog = _open_catalog(url)
    catalog.confine = confine  # type: ignore[attr-defined]
    return catalog


def _is_missing_sqlite_catalog(url: str) -> bool:
    """True for a SQLite catalog file that does not exist (`_open_catalog` would create it)."""
    return (
        url.split("://", 1)[0].lower() == "sqlite"
        and url.startswith("sqlite:///")
        and not os.path.exists(url[len("sqlite:///") :])
    )


#: The FileIO of every table pcbo opens, a catalog property (pcbo's own: a table's `py-io-impl` is a
#: finding, `property_findings`): the lake's own file system on an object store (`lake_file_io`).
LAKE_FILE_IO = {"py-io-impl": "pcbo_dagster.tables.lake_file_io.LakeFileIO"}


def _open_catalog(url: str) -> Catalog:
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        from pyiceberg.catalog.rest import RestCatalog

        properties = {"uri": url}
        for variable, name in ((REST_TOKEN_ENV, "token"), (REST_CREDENTIAL_ENV, "credential")):
            if os.environ.get(variable):
                properties[name] = os.environ[variable]
        return _own_file_io(RestCatalog)("pcbo", **properties, **LAKE_FILE_IO)
    from pyiceberg.catalog.sql import SqlCatalog

    if scheme == "postgresql":
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    elif scheme == "sqlite" and url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url[len("sqlite:///") :]) or ".", exist_ok=True)
    return _own_file_io(SqlCatalog)("pcbo", uri=url, **LAKE_FILE_IO)


@functools.cache
def _own_file_io(catalog_class: type[Catalog]) -> type[Catalog]:
    """`catalog_class` whose tables' FileIO comes from the catalog's own properties (pcbo's settings)
    only. pyiceberg builds it from the table's properties too, which live in the table's metadata file in
    the lake: `py-io-impl` there names a class to import and call (code execution by whoever can write
    the lake), `s3.endpoint` where to read the manifests from. Such properties are a finding instead
    (`property_findings`)."""
    from pyiceberg.io import FileIO, load_file_io

    class _OwnFileIO(catalog_class):  # type: ignore[misc, valid-type]
        confine: Callable[[str], None] | None = None

        def _load_file_io(self, properties: Any = None, location: str | None = None) -> FileIO:
            # (Called with the metadata file's location before it is read: REST loads, every commit.)
            if location is not None and self.confine is not None:
                self.confine(location)
            return load_file_io(dict(self.properties), location)

        def _convert_orm_to_iceberg(self, orm_table: Any) -> Table:
            # (The SQL catalog's load: it reads the metadata file its row names with its own FileIO.)
            if self.confine is not None and orm_table.metadata_location:
                self.confine(orm_table.metadata_location)
            return super()._convert_orm_to_iceberg(orm_table)

    _OwnFileIO.__name__ = _OwnFileIO.__qualname__ = catalog_class.__name__
    return _OwnFileIO


def partition_field(windows: list[tuple[int, int]], ledger_field: str | None) -> tuple[str, Any, str] | None:
    """(source column, transform, field name) of the partition spec that follows the dataset's
    partitioning, from its partitions' windows ([start, end) in microseconds, or ledger sequences):
    the finest of hour/day/month/year (on `occurredAt`) that holds each window in one value; a
    ledger grid aligned to its width gets `truncate(width)` on the ledger field. None (unpartitioned;
    engines still prune on every file's column statistics) when none fits."""
    from pyiceberg.transforms import (
        DayTransform,
        HourTransform,
        MonthTransform,
        TruncateTransform,
        YearTransform,
    )

    if not windows:
        return None
    if ledger_field is not None:
        width = max(end - start for start, end in windows)
        if all(start % width == 0 for start, _ in windows):
            return ledger_field, TruncateTransform(width), f"{ledger_field}_trunc"
        return None
    transforms: tuple[Any, ...] = (HourTransform(), DayTransform(), MonthTransform(), YearTransform())
    for transform in transforms:
        if all(_bucket(transform, start) == _bucket(transform, end - 1) for start, end in windows):
            return "occurredAt", transform, f"occurredAt_{str(transform).split('(')[0].lower()}"
    return None


def _bucket(transform: Any, position: int) -> int:
    """The partition value of a position (microseconds, or a ledger sequence) under `transform`."""
    name = type(transform).__name__
    if name == "TruncateTransform":
        return position - position % transform.width
    if name == "HourTransform":
        return position // 3_600_000_000
    if name == "DayTransform":
        return position // 86_400_000_000
    moment = to_datetime(position)
    if name == "MonthTransform":
        return (moment.year - 1970) * 12 + moment.month - 1
    if name == "YearTransform":
        return moment.year - 1970
    raise ValueError(f"no partition value for {transform}")


def _position(value: str | int) -> int:
    """A window bound of a commit event: a ledger sequence, or an instant as outputs write it
    (`YYYY-MM-DDTHH:MM:SS[.ffffff]Z`) in microseconds."""
    if isinstance(value, int):
        return value
    moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment - _EPOCH) // dt.timedelta(microseconds=1)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# -- column names ----------------------------------------------------------------------------------

#: Iceberg's metadata columns (the spec's reserved field ids 2147483646-2147483642 and
#: 2147483543-2147483539). Spark and DuckDB answer a query for one with a data column of that name when
#: the table has one (a record would say which file, position or row it came from); `verify` and
#: publication read the table's own schema against the same names (`column_name_problems`).
ICEBERG_METADATA_COLUMNS = (
    "_file",
    "_pos",
    "_deleted",
    "_spec_id",
    "_partition",
    "_change_type",
    "_change_ordinal",
    "_commit_snapshot_id",
    "_row_id",
    "_last_updated_sequence_number",
)
#: DuckDB's virtual columns of `iceberg_scan` and its other file readers, shadowed the same way by a
#: data column of the same name.
DUCKDB_VIRTUAL_COLUMNS = ("filename", "file_row_number", "file_index")
#: The partition field names `partition_field` gives a time table: a column of the same name cannot be
#: partitioned by (Iceberg refuses the spec). A ledger table's is `<ledger field>_trunc`.
TIME_PARTITION_FIELDS = tuple(f"occurredAt_{unit}" for unit in ("hour", "day", "month", "year"))


#: The record fields pcbo gives a meaning (the contract's known fields; `core/record_table.py` and
#: `core/decisions.py` read them, literals here to keep pyarrow out of this module's import).
PCBO_COLUMNS = ("id", "occurredAt", "retentionExpiresAt", "jurisdiction", "consentGranted")


def column_name_problems(names: list[str], partition_fields: list[str]) -> list[tuple[str, str]]:
    """(column, why) for each of a table's top-level column `names` that a reader cannot tell from
    something else: an Iceberg metadata column, a DuckDB virtual column, a Trino hidden column (`$…`:
    `$path`, `$partition`, `$file_modified_time`), one of the table's `partition_fields`, or an
    earlier column of `names`. Names are compared as readers that fold case compare them
    (`same_name`: `_FILE` is `_file` to Spark, `ID` is `id` to DuckDB)."""
    from pcbo_dagster.sources.streaming import same_name

    # pcbo's own columns first: of `id` and `ID`, `ID` is the one that clashes
    names = sorted(names, key=lambda name: name not in PCBO_COLUMNS)
    reserved = {same_name(n): f"Iceberg's metadata column {n}" for n in ICEBERG_METADATA_COLUMNS}
    reserved.update({same_name(n): f"DuckDB's virtual column {n}" for n in DUCKDB_VIRTUAL_COLUMNS})
    reserved.update({same_name(n): f"the table's partition field {n}" for n in partition_fields})
    seen: dict[str, str] = {}
    problems = []
    for name in names:
        key = same_name(name)
        if key in reserved:
            problems.append((name, f"it is {reserved[key]} to readers"))
        elif name.startswith("$"):
            problems.append(
                (name, "Trino names its hidden columns $… ($path, $partition, $file_modified_time)")
            )
        elif key in seen:
            problems.append(
                (
                    name,
                    f"it is column {seen[key]} to readers that fold case (DuckDB, Spark, Trino)",
                )
            )
        seen.setdefault(key, name)
    return problems


def partition_field_names(plan: Plan | None) -> list[str]:
    """The partition field names a table of `plan`'s dataset version may get (`partition_field`)."""
    ledger = [f"{plan.ledger_field}_trunc"] if plan is not None and plan.ledger_field is not None else []
    return [*TIME_PARTITION_FIELDS, *ledger]


def refuse_column_names(
    names: list[str], partition_fields: list[str], field_of: Callable[[str], str]
) -> None:
    """`InvalidInput` on the field (`field_of(column)`: `sourceRecords[i].<column>`, `source.<column>`)
    of the first of a run's columns `names` that cannot be a column of the table it publishes to
    (`column_name_problems`); nothing is published or written."""
    problems = column_name_problems(names, partition_fields)
    if problems:
        name, why = problems[0]
        raise InvalidInput(
            field_of(name),
            f"a field published to an Iceberg table cannot be named {name!r}: {why} "
            "(rename the field, or publish no table)",
        )


def column_findings(table: Table) -> list[dict[str, str]]:
    """`table_column_name_clash` for each column of the table's schema that readers cannot tell from
    a metadata, virtual or partition column or from another column (`column_name_problems`): a table
    made before pcbo refused such fields, or a schema edited by hand. Nothing is published to it."""
    partition_fields = sorted({f.name for spec in table.metadata.partition_specs for f in spec.fields})
    names = [f.name for f in table.schema().fields]
    return [
        _finding("table_column_name_clash", scrub_text(name)[:300], scrub_text(why))
        for name, why in column_name_problems(names, partition_fields)
    ]


# -- publishing ------------------------------------------------------------------------------------


@dataclass
class Publisher:
    """Publishes one dataset version's chain to its table's branch (see the module doc)."""

    env: Environment
    target: TableTarget
    dataset: str
    version_label: str
    #: The partitions' windows and the ledger field (None: time windows), to partition a table
    #: created now; None: from the chain's time windows (a table created by `verify --repair`).
    partitioning: tuple[list[tuple[int, int]], str | None] | None = None
    table: Table | None = None
    live: TableState | None = None
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    #: `record` has declared (or found declared) this target on the chain and in the catalog.
    recorded: bool = False

    @property
    def chain_key(self) -> str:
        return f"{self.dataset}/{self.version_label}"

    @property
    def where(self) -> str:
        return f"{self.target.name}@{self.target.branch}"

    def _load(
        self, create_from: PublishedFile | None, expected_now: dict[str, PublishedFile]
    ) -> Table | None:
        from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError

        catalog = open_catalog(self.target.catalog_url, table_metadata_confinement(self.env, self.target))
        try:
            table = read_table_metadata(lambda: catalog.load_table(self.target.name))
        except TableUnreadable as exc:
            raise PublicationRefused(self.where, exc.findings) from None
        except NoSuchTableError:
            if create_from is None:
                return None
            outside = location_findings(self.env, self.target)
            if outside:  # never create a table's files through a link out of the lake
                raise PublicationRefused(self.where, outside) from None
            namespace = self.target.name.split(".")[0]
            try:
                catalog.create_namespace(namespace)
            except NamespaceAlreadyExistsError:
                pass
            table = self._create(catalog, create_from, expected_now)
        outside = (
            location_findings(self.env, self.target, table)
            or property_findings(self.target, table)
            or column_findings(table)
        )
        if outside:
            raise PublicationRefused(self.where, outside)
        if table.metadata.properties.get(TABLE_CHAIN_KEY) != self.chain_key:
            raise PublicationRefused(
                self.where,
                [
                    _finding(
                        "table_not_this_dataset",
                        self.target.name,
                        f"the table was not created for {self.chain_key}",
                    )
                ],
            )
        self.record()
        return table

    def record(self, chain: list[dict[str, Any]] | None = None) -> None:
        """Declare on the chain, then record in the catalog, where this dataset version's branch
        publishes (before anything is written to the lake: a table a crash kept from being created is
        then still checked, and healed). `InvalidInput` when the chain declares another table. Once per
        publisher; `chain`: the chain's events, when already read."""
        if self.recorded:
            return
        row = TablePublicationRow(
            dataset=self.dataset,
            version_label=self.version_label,
            branch=self.target.branch,
            table_format="iceberg",
            catalog_url=self.target.public_catalog,
            table_name=self.target.name,
        )
        if chain is None:
            chain = verified_events(self.env, self.dataset, self.version_label)
        declared = declared_publications(chain, self.env.operator_verifier).get(row["branch"])
        if declared is None:
            self.env.audit.append(self.chain_key, TABLE_PUBLICATION_RECORDED, declaration_body(row))
        elif _names(declared) != _names(row):
            raise InvalidInput(
                "table",
                f"{self.chain_key} is published to {declared['table_name']} in {declared['catalog_url']} "
                f"({declared['branch']}), as its audit chain declares: a dataset version publishes to one "
                "table (use a new versionLabel for another table)",
            )
        self.env.catalog.record_table_publication(row)
        self.recorded = True

    def _create(
        self, catalog: Catalog, first: PublishedFile, expected_now: dict[str, PublishedFile]
    ) -> Table:
        import pyarrow.parquet as pq
        from pyiceberg.table.name_mapping import create_mapping_from_schema

        with self.env.lake.open(first.path) as handle:
            arrow_schema = pq.read_schema(handle)
        if self.partitioning is not None:
            spec = partition_field(*self.partitioning)
        else:
            windows = [(f.start, f.end) for f in expected_now.values()]
            time_windows = all(isinstance(v, str) for w in windows for v in w)
            spec = (
                partition_field([(_position(a), _position(b)) for a, b in windows], None)
                if time_windows
                else None
            )
        self._refuse_columns(arrow_schema.names, [spec[2]] if spec is not None else [], first)
        namespace, name = self.target.name.split(".")
        table = catalog.create_table(
            self.target.name,
            schema=arrow_schema,
            location=f"{self.target.warehouse}/{namespace}/{name}",
            properties={TABLE_CHAIN_KEY: self.chain_key, TABLE_LAKE: redact_url(self.env.lake.url)},
        )
        with table.transaction() as tx:
            if spec is not None:
                with tx.update_spec() as update:
                    update.add_field(spec[0], spec[1], spec[2])
            tx.set_properties(
                {NAME_MAPPING_PROPERTY: create_mapping_from_schema(table.schema()).model_dump_json()}
            )
        if self.target.branch != MAIN_BRANCH:
            created = {P_KIND: TABLE_CREATED_KIND, P_CHAIN_KEY: self.chain_key, P_BRANCH: MAIN_BRANCH}
            with table.transaction() as tx:
                with tx.update_snapshot(snapshot_properties=created).fast_append():
                    pass
        return table

    def _refuse_columns(
        self, names: list[str], partition_fields: list[str], published: PublishedFile
    ) -> None:
        """`PublicationRefused` (`table_column_name_clash`, nothing published) when the columns the
        table would have with `published`'s are not all told apart by readers (`column_name_problems`):
        a file a run wrote before the dataset version published to a table, or before pcbo refused
        such fields."""
        problems = column_name_problems(names, partition_fields)
        if problems:
            raise PublicationRefused(
                self.where,
                [
                    _finding(
                        "table_column_name_clash", published.path, scrub_text(f"column {name[:80]}: {why}")
                    )
                    for name, why in problems
                ],
            )

    def _open(self, state: ChainState, create_from: PublishedFile | None) -> bool:
        """Load (or create) the table and judge it against the chain; False when there is no table
        and nothing to create it for. `PublicationRefused` when it diverged."""
        if self.table is not None:
            return True
        # (before the table is created: a chain edited since the run began creates nothing)
        events = verified_events(self.env, self.dataset, self.version_label)
        table = self._load(create_from, expected_files(state, self.dataset, self.version_label))
        if table is None:
            return False
        try:
            current = read_state(
                table,
                self.target.branch,
                self.env.lake.url,
                self.dataset,
                self.version_label,
                table_metadata_confinement(self.env, self.target),
            )
        except TableUnreadable as exc:
            self.refused = exc.findings
            raise PublicationRefused(self.where, exc.findings) from None
        judgement = judge(
            table, current, self.target.branch, events, state, self.dataset, self.version_label, self.env.lake
        )
        if judgement.verdict == "diverged":
            self.refused = judgement.findings
            raise PublicationRefused(self.where, judgement.findings)
        self.table, self.live = table, current
        return True

    def publish(self, state: ChainState, *, run_id: str | None, reason: str) -> dict[str, Any] | None:
        """Bring the branch to what `state` (the chain as it is now) implies, in one snapshot; None
        when it already is. `PublicationRefused` (nothing published) when the table diverged."""
        expected = expected_files(state, self.dataset, self.version_label)
        if not self._open(state, next(iter(sorted(expected.values(), key=lambda f: f.path)), None)):
            return None
        assert self.table is not None and self.live is not None
        live = self.live.files
        removed = [
            p for p in sorted(live) if p not in expected or not _matches({p: live[p]}, {p: expected[p]})
        ]
        added = [expected[p] for p in sorted(expected) if p not in live or p in removed]
        if not removed and not added:
            return None
        changed = sorted({p.split("/")[2] for p in removed} | {f.key for f in added})
        properties = self._properties(state, expected, changed, run_id, reason)
        tx = _transaction(self.table)
        data_files = self._data_files(tx, added)
        update = tx.update_snapshot(snapshot_properties=properties, branch=self.target.branch)
        # (Nothing removed, as in a first run: an append, which rewrites no existing manifest.)
        with update.overwrite() if removed else update.fast_append() as change:
            for path in removed:
                change.delete_data_file(live[path])
            for data_file in data_files:
                change.append_data_file(data_file)
        self.table = tx.commit_transaction()
        snapshot = self.table.metadata.snapshot_by_name(self.target.branch)
        assert snapshot is not None
        for path in removed:
            del live[path]
        for published, data_file in zip(added, data_files, strict=True):
            live[published.path] = data_file
        outcome = {
            "snapshotId": snapshot.snapshot_id,
            "branch": self.target.branch,
            "partitions": changed,
            "filesAdded": len(added),
            "filesRemoved": len(removed),
            "reason": reason,
        }
        self.snapshots.append(outcome)
        return outcome

    def _properties(
        self,
        state: ChainState,
        expected: dict[str, PublishedFile],
        keys: list[str],
        run_id: str | None,
        reason: str,
    ) -> dict[str, str]:
        partitions = []
        runs: dict[str, dict[str, Any]] = {}
        for key in keys:
            history = state.partitions[key]
            last = history.last_event or {}
            current = history.current_version
            entry = {
                "key": key,
                "version": history.current,
                "manifest_checksum": current.manifest_checksum if current else None,
                "event_type": last.get("event_type"),
                "event_hash": last.get("chain", {}).get("event_hash"),
                "run_id": current.run_id if current else last.get("run_id"),
            }
            if current is not None and current.run_id is not None:
                runs[current.run_id] = {
                    "plan_hash": current.event.get("plan_hash"),
                    "decision_hash": current.event.get("decision_hash"),
                }
            if last.get("event_type") == PARTITION_ROLLED_BACK:
                entry["rolled_back_version"] = last.get("partition", {}).get("version")
            partitions.append(entry)
        properties = {
            P_KIND: PUBLICATION_KIND,
            P_CHAIN_KEY: self.chain_key,
            P_BRANCH: self.target.branch,
            P_AUDIT_SEQ: str(state.length - 1),
            P_AUDIT_HEAD: state.head_hash or "",
            P_PARTITIONS: json.dumps(partitions, sort_keys=True, separators=(",", ":")),
            P_RUNS: json.dumps(runs, sort_keys=True, separators=(",", ":")),
            P_FILES_DIGEST: files_digest(set(expected)),
            P_FILE_COUNT: str(len(expected)),
            P_RUN_ID: run_id or "",
            P_REASON: reason,
        }
        if self.target.approved_snapshot_id is not None:
            properties[P_APPROVED_SNAPSHOT] = str(self.target.approved_snapshot_id)
        return properties

    def _data_files(self, tx: Transaction, files: list[PublishedFile]) -> list[DataFile]:
        """Data files for `files` as they are (`derive_data_files`); new columns are added to the
        table's schema first."""
        footers = [_read_footer(self.env.lake, published) for published in files]
        # (`tx.table_metadata` is a deep copy at each access: taken once per change.)
        known = set(tx.table_metadata.schema()._name_to_id)
        arrow_schemas: dict[Any, Any] = {}  # the run's files share a schema: each distinct one converted once
        for published, metadata in zip(files, footers, strict=True):
            arrow_schema = arrow_schemas.setdefault(metadata.schema, metadata.schema.to_arrow_schema())
            if set(arrow_schema.names) - known:
                table_metadata = tx.table_metadata
                self._refuse_columns(
                    list(
                        dict.fromkeys(
                            [*(f.name for f in table_metadata.schema().fields), *arrow_schema.names]
                        )
                    ),
                    sorted({f.name for spec in table_metadata.partition_specs for f in spec.fields}),
                    published,
                )
                with tx.update_schema() as update:
                    update.union_by_name(arrow_schema)
                known = set(tx.table_metadata.schema()._name_to_id)
        return derive_data_files(
            self.env.lake.url, tx.table_metadata, files, footers, self.where, arrow_schemas
        )

    def summary(self) -> dict[str, Any]:
        """What the run published, for its output document."""
        status = "refused" if self.refused else ("published" if self.snapshots else "unchanged")
        document: dict[str, Any] = {**self.target.describe(), "status": status, "snapshots": self.snapshots}
        if self.table is not None:
            snapshot = self.table.metadata.snapshot_by_name(self.target.branch)
            document["snapshotId"] = snapshot.snapshot_id if snapshot is not None else None
            document["metadataLocation"] = redact_url(self.table.metadata_location)
        if self.refused:
            document["findings"] = self.refused
        return document


def _read_footer(lake: LakeStorage, published: PublishedFile) -> Any:
    import pyarrow.parquet as pq

    with lake.open(published.path) as handle:
        return pq.read_metadata(handle)


def derive_data_files(
    lake_url: str,
    table_metadata: Any,
    files: list[PublishedFile],
    footers: list[Any],
    where: str,
    arrow_schemas: dict[Any, Any] | None = None,
) -> list[DataFile]:
    """The data files pcbo registers for `files` (their parquet `footers`) in a table of
    `table_metadata`: the files as they are (footer statistics, the partition value from the
    partition's window). `PublicationRefused` when a file's schema or window does not fit the table.
    `arrow_schemas`: the footers' schemas already converted to Arrow."""
    arrow_schemas = {} if arrow_schemas is None else arrow_schemas
    from pyiceberg.io.pyarrow import (
        _check_pyarrow_schema_compatible,
        compute_statistics_plan,
        data_file_statistics_from_parquet_metadata,
        parquet_path_to_id_mapping,
    )
    from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
    from pyiceberg.typedef import Record

    schema, spec, spec_id = table_metadata.schema(), table_metadata.spec(), table_metadata.default_spec_id
    stats_columns = compute_statistics_plan(schema, table_metadata.properties)
    column_mapping = parquet_path_to_id_mapping(schema)
    compatible: set[Any] = set()
    result = []
    for published, metadata in zip(files, footers, strict=True):
        if metadata.schema not in compatible:
            try:
                arrow_schema = arrow_schemas.setdefault(metadata.schema, metadata.schema.to_arrow_schema())
                # (On a mismatch pyiceberg prints its comparison table to standard output, where the
                # command's JSON document goes: its text is in the exception, the finding's detail.)
                with contextlib.redirect_stdout(io.StringIO()):
                    _check_pyarrow_schema_compatible(schema, arrow_schema)
            except ValueError as exc:
                raise PublicationRefused(
                    where, [_finding("table_schema_conflict", published.path, scrub_text(str(exc)))]
                ) from None
            compatible.add(metadata.schema)
        statistics = data_file_statistics_from_parquet_metadata(
            parquet_metadata=metadata,
            stats_columns=stats_columns,
            parquet_column_mapping=column_mapping,
        )
        values = []
        for spec_field in spec.fields:
            start, end = _position(published.start), _position(published.end)
            try:
                value, last = _bucket(spec_field.transform, start), _bucket(spec_field.transform, end - 1)
            except ValueError:  # a transform pcbo never partitions by (the table's metadata was edited)
                last, value = None, 0
            if value != last:
                raise PublicationRefused(
                    where,
                    [
                        _finding(
                            "table_partition_spec_mismatch",
                            published.path,
                            f"partition {published.key} does not fit one {spec_field.name} value "
                            f"({scrub_text(str(spec_field.transform))[:80]})",
                        )
                    ],
                )
            values.append(value)
        result.append(
            DataFile.from_args(
                content=DataFileContent.DATA,
                file_path=f"{lake_url}/{published.path}",
                file_format=FileFormat.PARQUET,
                partition=Record(*values),
                file_size_in_bytes=published.byte_size,
                sort_order_id=None,
                spec_id=spec_id,
                equality_ids=None,
                key_metadata=None,
                **statistics.to_serialized_dict(),
            )
        )
    return result


#: What a data file's entry tells readers besides its path, row count and size (checked by `judge`):
#: an entry whose partition value or bounds are forged has readers prune the file away.
_READ_FIELDS = (
    "content",
    "file_format",
    "partition",
    "value_counts",
    "null_value_counts",
    "nan_value_counts",
    "lower_bounds",
    "upper_bounds",
    "column_sizes",
    "split_offsets",
    "equality_ids",
    "key_metadata",
    "sort_order_id",
)


def data_file_findings(
    lake: LakeStorage, table: Table, current: TableState, state: ChainState, dataset: str, version_label: str
) -> list[dict[str, str]]:
    """`table_file_metadata_mismatch` for each file of a committed version the table lists with other
    partition values, statistics or attributes than the lake's file itself gives (what pcbo registers,
    `derive_data_files`). Files no longer in the lake are left to the lake's own checks."""
    known = committed_files(state, dataset, version_label)
    files, footers = [], []
    for path in sorted(set(current.files) & set(known)):
        try:
            footers.append(_read_footer(lake, known[path]))
        except (OSError, ValueError):  # gone (a rollback) or unreadable: the lake's checks say so
            continue
        files.append(known[path])
    if not files:
        return []
    try:
        derived = derive_data_files(lake.url, table.metadata, files, footers, "")
    except PublicationRefused as exc:
        return exc.findings
    findings = []
    for published, want in zip(files, derived, strict=True):
        have = current.files[published.path]
        differ = [
            n for n in _READ_FIELDS if (getattr(have, n, None) or None) != (getattr(want, n, None) or None)
        ]
        if differ:
            findings.append(
                _finding(
                    "table_file_metadata_mismatch",
                    published.path,
                    f"the table's entry for the file says other {', '.join(differ)} than the file itself",
                )
            )
    return findings


def _transaction(table: Table) -> Transaction:
    """A transaction on `table` that copies its metadata once per change (see `_one_copy_transaction`)."""
    return _one_copy_transaction()(table)


@functools.cache
def _one_copy_transaction() -> type[Transaction]:
    """pyiceberg 0.12 deep-copies the whole table metadata (every snapshot's summary) at each read of
    a transaction's `table_metadata`, about twenty times per snapshot; the metadata models are frozen
    and replaced, never changed in place, so one copy per state of the transaction is enough."""
    from pyiceberg.table import Transaction

    class _OneCopyPerChange(Transaction):
        _copy: tuple[Any, Any, Any] | None = None

        @property
        def table_metadata(self) -> Any:
            copy = self._copy
            if copy is None or copy[0] is not self._table.metadata or copy[1] is not self._updates:
                copy = self._copy = (self._table.metadata, self._updates, super().table_metadata)
            return copy[2]

    return _OneCopyPerChange


def publisher_for(
    env: Environment,
    spec: TableSpec | None,
    dataset: str,
    version_label: str,
    *,
    verified: ChainState,
    plan: Plan | None = None,
    given: TableTarget | None = None,
    columns: list[str] | None = None,
    field_of: Callable[[str], str] = str,
) -> Publisher | None:
    """The publisher of a dataset version (None when it publishes nowhere); see `resolve_target`.
    `verified`: the replay of the chain the caller verified (`partition_checks.verified_chain`) under
    the dataset's lock it still holds, the run's or rollback's own events since replayed into it:
    whether the dataset version publishes at all is decided from it, never from another read of the
    backup (which someone who can write the backup could have changed since). `columns`: the run's
    columns, refused (`refuse_column_names`, `field_of` naming a column's field) before the table is
    declared or anything written."""
    if spec is None and given is None and not declared_publications(verified.other, env.operator_verifier):
        return None  # it publishes nowhere (no table given, none declared): nothing more is read
    chain = verified_events(env, dataset, version_label)  # where, and what is published: verified again
    target = resolve_target(env, spec, dataset, version_label, given, chain)
    if target is None:
        return None
    refuse_column_names(columns or [], partition_field_names(plan), field_of)
    partitioning = None if plan is None else ([(p.start, p.end) for p in plan.partitions], plan.ledger_field)
    publisher = Publisher(env, target, dataset, version_label, partitioning)
    publisher.record(chain)
    return publisher


def publish_or_refuse(
    publisher: Publisher, state: ChainState, run_id: str | None, reason: str = "execute"
) -> str | None:
    """An execute's (or a rollback's) `publisher.publish`; the refusal's text (recorded as a
    discrepancy of the run, when there is one; its findings in `publisher.refused`) instead of
    raising."""
    try:
        publisher.publish(state, run_id=run_id, reason=reason)
    except PublicationRefused as exc:
        publisher.refused = publisher.refused or exc.findings
        if run_id is None:
            return str(exc)
        publisher.env.catalog.record_discrepancy(
            run_id=run_id,
            dataset=publisher.dataset,
            version_label=publisher.version_label,
            partition_key=None,
            kind="table_publication_refused",
            detail={"table": publisher.target.describe(), "findings": exc.findings},
        )
        return str(exc)
    return None


# -- where: declared on the chain -----------------------------------------------------------------


def declaration_body(row: TablePublicationRow) -> dict[str, Any]:
    """The body of the `table_publication_recorded` event declaring `row` (no credentials: the
    catalog URL is the public one)."""
    from pcbo_dagster.engine.events import PRODUCER

    return {
        "table": {
            "format": row["table_format"],
            "catalog": row["catalog_url"],
            "name": row["table_name"],
            "branch": row["branch"],
        },
        "producer": PRODUCER,
    }


def declared_publications(
    events: Iterable[Mapping[str, Any]], verifier: VerifierKey | None
) -> dict[str, TablePublicationRow]:
    """The table each branch publishes to, as the chain (`<dataset>/<versionLabel>`) declares it: the
    first `table_publication_recorded` event per branch; with the operator's `verifier`
    (`Environment.operator_verifier`), the first one its key signed (someone who can rewrite the
    audit backup and the catalog consistently but holds no key declares no table: pcbo would create
    the catalog it names and publish the dataset there). None: no key, every declaration counts."""
    declared: dict[str, TablePublicationRow] = {}
    for event in events:
        if event.get("event_type") != TABLE_PUBLICATION_RECORDED:
            continue
        if verifier is not None and verified_statement(event, verifier) is None:
            continue
        table = event.get("table") or {}
        dataset, _, version_label = str(event.get("chain", {}).get("chain_key", "")).partition("/")
        branch = str(table.get("branch"))
        declared.setdefault(
            branch,
            TablePublicationRow(
                dataset=dataset,
                version_label=version_label,
                branch=branch,
                table_format=str(table.get("format")),
                catalog_url=str(table.get("catalog")),
                table_name=str(table.get("name")),
            ),
        )
    return declared


def _names(row: TablePublicationRow) -> tuple[str, str, str]:
    return (row["table_format"], row["catalog_url"], row["table_name"])


def property_findings(target: TableTarget, table: Table) -> list[dict[str, str]]:
    """`table_properties_altered` when the table sets a property pcbo never sets (they choose code
    pyiceberg imports — `py-io-impl`, `write.py-location-provider.impl` —, where it writes —
    `write.metadata.path` —, or how readers read), or when its name mapping binds the files' columns to
    other fields than the schema's names say (columns swapped for every reader). Nothing is published to
    such a table."""
    findings = []
    unexpected = sorted(set(table.metadata.properties) - PCBO_TABLE_PROPERTIES)
    if unexpected:
        shown = ", ".join(name[:80] for name in unexpected[:5])
        findings.append(
            _finding(
                "table_properties_altered",
                target.name,
                scrub_text(f"the table sets properties pcbo never sets: {shown}"),
            )
        )
    mapping = table.metadata.name_mapping()
    if mapping is None or mapping != table.schema().name_mapping:
        findings.append(
            _finding(
                "table_properties_altered",
                target.name,
                f"its {NAME_MAPPING_PROPERTY} binds the files' columns to fields other than the schema names",
            )
        )
    return findings


class TableUnreadable(IntegrityError):
    """The table's metadata names a file outside its metadata directory in the lake, or a file pcbo
    cannot read as what it should be: nothing of it is trusted (`findings`)."""

    def __init__(self, findings: list[dict[str, str]]) -> None:
        self.findings = findings
        super().__init__("; ".join(f"{f['kind']}: {f['detail']}" for f in findings))


def _table_home(env: Environment, target: TableTarget) -> tuple[LakeStorage, str]:
    """The lake holding the table's warehouse, and the table's directory in it."""
    namespace, _, name = target.name.partition(".")
    lake_url = target.warehouse.removesuffix(f"/{WAREHOUSE_DIR}")
    lake = env.lake if lake_url == env.lake.url else LakeStorage(lake_url)
    return lake, f"{WAREHOUSE_DIR}/{namespace}/{name}"


def table_metadata_confinement(env: Environment, target: TableTarget) -> Callable[[str], None]:
    """What a table's metadata may name for pcbo to read: a file of the table's `metadata` directory in
    the lake (where pyiceberg writes its metadata files, manifest lists and manifests), reached through
    no symbolic link. Anything else — the catalog pointing at a file elsewhere on the host, a manifest
    list of another table — raises `TableUnreadable` (`path_outside_lake`) before it is read. (A
    `staging` branch's table is in the production lake, which a staging environment does not know: its
    metadata directory is the `_iceberg/<ns>/<table>/metadata` directory of the first file read, the
    catalog's metadata file, and everything after must be in that one.)"""
    lake, rel = _table_home(env, target)
    directory = f"{rel}/metadata"
    bound: list[str] = [f"{lake.url}/{directory}/"] if target.branch == MAIN_BRANCH else []

    def confine(location: str) -> None:
        if not bound:
            base, _, name = location.rpartition("/")
            if base.endswith(f"/{directory}") and name and _plain_location(location):
                bound.append(f"{base}/")
        inside = bool(bound) and location.startswith(bound[0]) and "/" not in location[len(bound[0]) :]
        if inside and location.startswith(f"{lake.url}/"):
            inside = lake.inside(location[len(lake.url) + 1 :])
        elif inside:
            inside = _plain_location(location)
        if not inside:
            raise TableUnreadable(
                [
                    _finding(
                        "path_outside_lake",
                        redact_url(location)[:300],
                        f"the table's metadata names a file outside its metadata directory {directory} "
                        "in the lake (not read)",
                    )
                ]
            )

    return confine


def _plain_location(location: str) -> bool:
    """No `.`/`..` segment, and on a local disk no symbolic link on the way."""
    scheme, sep, rest = location.partition("://")
    path = rest if sep else location
    if any(part in (".", "..") for part in path.split("/")):
        return False
    if not sep or scheme == "file":
        local = path if path.startswith("/") else f"/{path}"
        return os.path.realpath(local) == os.path.normpath(local)
    return True


def load_table(env: Environment, target: TableTarget) -> Table:
    """The target's table through a catalog confined to its metadata directory in the lake
    (`NoSuchTableError` when there is none; `TableUnreadable`)."""
    catalog = open_catalog(target.catalog_url, table_metadata_confinement(env, target))
    return read_table_metadata(lambda: catalog.load_table(target.name))


def read_table_metadata(read: Callable[[], _T]) -> _T:
    """`read()` (pyiceberg reading a table's metadata), its failures to read what the lake holds as a
    `table_unreadable` finding (`TableUnreadable`) instead of an internal error."""
    from pyiceberg.exceptions import NoSuchTableError, ValidationError

    try:
        return read()
    except (PcboError, NoSuchTableError):
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError, ValidationError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise TableUnreadable(
            [_finding("table_unreadable", "metadata", scrub_text(f"{type(exc).__name__}: {first}"))]
        ) from None


def location_findings(
    env: Environment, target: TableTarget, table: Table | None = None
) -> list[dict[str, str]]:
    """`path_outside_lake` when the table's place in its lake's `_iceberg` warehouse (where its metadata
    and manifests are written) passes through a symbolic link, or when the loaded `table` of a `main`
    branch says it lives anywhere else. (A `staging` branch's table is the production lake's, checked
    there.)"""
    lake, rel = _table_home(env, target)
    expected = f"{lake.url}/{rel}"
    if not lake.inside(rel):
        return [
            _finding(
                "path_outside_lake",
                rel,
                "the table's location leads outside the lake or through a symbolic link",
            )
        ]
    if table is not None and target.branch == MAIN_BRANCH and table.location().rstrip("/") != expected:
        return [
            _finding(
                "path_outside_lake",
                rel,
                f"the table says it lives at {redact_url(table.location())}, "
                f"not {redact_url(expected)} in the lake",
            )
        ]
    return []


# -- verify --------------------------------------------------------------------------------------


def check_tables(
    env: Environment,
    events: list[dict[str, Any]],
    state: ChainState,
    dataset: str,
    version_label: str,
    repair: bool,
) -> list[tuple[str, dict[str, Any]]]:
    """Every recorded table of a dataset version against its chain, as (`find` | `healable` |
    `repaired`, entry). With `repair`, a publication a crash interrupted (`behind`) is completed."""
    from pyiceberg.exceptions import NoSuchTableError

    outcomes: list[tuple[str, dict[str, Any]]] = []
    declared = declared_publications(events, env.operator_verifier)
    recorded = {r["branch"]: r for r in env.catalog.table_publications(dataset, version_label)}
    for branch, row in sorted(recorded.items()):
        if branch not in declared or _names(declared[branch]) != _names(row):
            outcomes.append(
                (
                    "find",
                    _finding(
                        "table_publication_not_on_chain",
                        f"{row['table_name']}@{branch}",
                        f"the catalog records {row['table_name']} in {row['catalog_url']} as the table of "
                        f"{dataset}/{version_label} ({branch}), which its audit chain does not declare",
                    ),
                )
            )
    for branch, row in sorted(declared.items()):
        target = recorded_target(row, env)
        where = f"{target.name}@{target.branch}"
        if branch not in recorded:
            if repair:
                env.catalog.record_table_publication(row)
                outcomes.append(("repaired", {"kind": "table_publication_recorded", "where": where}))
            else:
                outcomes.append(
                    (
                        "healable",
                        _finding(
                            "table_publication_unrecorded",
                            where,
                            "the audit chain declares this table but the catalog has no row for it (a crash "
                            "window: verify --repair records it); the table is checked all the same",
                        ),
                    )
                )
        try:
            table = load_table(env, target)
        except NoSuchTableError:
            table = None
        except TableUnreadable as exc:
            outcomes += [("find", {**f, "where": f"{where}: {f['where']}"}) for f in exc.findings]
            continue
        outside = location_findings(env, target, table)
        if not outside and table is not None:
            outside = property_findings(target, table)
        if outside:
            outcomes += [("find", {**f, "where": f"{where}: {f['where']}"}) for f in outside]
            continue
        clash = column_findings(table) if table is not None else []  # (the files are judged all the same)
        outcomes += [("find", {**f, "where": f"{where}: {f['where']}"}) for f in clash]
        if table is None:
            if not expected_files(state, dataset, version_label):
                continue
            judgement = Judgement("behind", detail="the table does not exist (never created, or dropped)")
        else:
            try:
                current = read_state(
                    table,
                    target.branch,
                    env.lake.url,
                    dataset,
                    version_label,
                    table_metadata_confinement(env, target),
                )
            except TableUnreadable as exc:
                outcomes += [("find", {**f, "where": f"{where}: {f['where']}"}) for f in exc.findings]
                continue
            judgement = judge(table, current, target.branch, events, state, dataset, version_label, env.lake)
        if judgement.verdict == "in_sync":
            continue
        if judgement.verdict == "diverged":
            outcomes += [("find", {**f, "where": f"{where}: {f['where']}"}) for f in judgement.findings]
            continue
        if not repair:
            outcomes.append(
                (
                    "healable",
                    _finding(
                        "table_publication_behind",
                        where,
                        f"{judgement.detail} (a crash window: verify --repair publishes the rest)",
                    ),
                )
            )
            continue
        if clash:  # nothing is published to it
            continue
        publisher = Publisher(env, target, dataset, version_label)
        try:
            done = publisher.publish(state, run_id=None, reason="repair")
        except PublicationRefused as exc:  # (a file whose columns the table cannot hold)
            outcomes += [("find", {**f, "where": f"{where}: {f['where']}"}) for f in exc.findings]
            continue
        outcomes.append(("repaired", {"kind": "table_published", "where": where, "snapshot": done}))
    return outcomes
