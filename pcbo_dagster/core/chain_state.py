"""What a dataset's audit chain says must be true of its partitions: the chain replayed from seq 0.

Pure: no I/O. `replay(events)` walks a chain (`<dataset>/<versionLabel>`) in seq order and derives,
per partition key, every version ever committed (its manifest checksum, the commit event, the
version it superseded), which version is current after the commits and rollbacks, and the intent
that is still open (recorded before the lake was touched, not yet completed by its event).

The commit protocol (CONTRACT section 4) appends, per commit batch:

1. `partition_commit_intent` listing, per partition, the version and the exact manifest checksum
   about to become its commit point, and the commit point it replaces;
2. (the lake: data files, version and rollback manifests, then `_manifest.json`, the commit point);
3. `partition_committed` per partition.

A rollback appends `partition_rollback_intent` (per partition: the version it undoes with its
checksum, the version it restores with its checksum, or none) before it touches the lake, then
`partition_rolled_back` per partition. A crash between an intent and its completion leaves the lake
in exactly one of two states the intent names (before, or after the commit point moved): only the
second may be healed, by appending the missing completion event (`engine/crash_windows.py`).

A SQL table target (issue 15) has its own partition events, replayed into `ChainState.sql` per
(target table, partition key): `sql_apply_intent` (recorded before the table is touched: the run,
the plan and decision hashes, the chunks about to be applied, the digests of the rows and outcomes
they hold, the journal before them), then
`sql_partition_applied` naming that intent's seq; `sql_rollback_intent` (the applies about to be
undone, with their journal digests), then `sql_partition_rolled_back` per partition. An apply whose
intent has no completion event is open: a crash (or a kill) stopped it, and only a table whose
checkpoints show every chunk of it done is completed by appending the event; otherwise it is
resumed by the same request, or rolled back. (`sql_rollback_script`, the checksum of a run's
rollback script, carries no partition state: it is kept in `other`.)

`replay` also reports what makes the chain inconsistent with itself (a commit that does not follow
the version the chain says is current, a rollback of a version that is not current, a version
number used twice, a second commit event for the same manifest): `ChainState.findings`.
Events of other types (approvals, ...) are kept in `other` in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PARTITION_COMMIT_INTENT = "partition_commit_intent"
PARTITION_COMMITTED = "partition_committed"
PARTITION_ROLLBACK_INTENT = "partition_rollback_intent"
PARTITION_ROLLED_BACK = "partition_rolled_back"
#: A run found the partition's lake state disagreeing with the chain and put back, byte for byte, the
#: version the chain says is current (no change to the partition's history).
PARTITION_RESTORED = "partition_restored"
#: The events that change what a dataset version's lake partitions should hold (a lake writer's
#: decisions rest on them: `AuditLog.append_many`'s fence).
LAKE_EVENTS = frozenset(
    {
        PARTITION_COMMIT_INTENT,
        PARTITION_COMMITTED,
        PARTITION_ROLLBACK_INTENT,
        PARTITION_ROLLED_BACK,
        PARTITION_RESTORED,
    }
)
#: SQL table targets (issue 15; see the module doc).
SQL_APPLY_INTENT = "sql_apply_intent"
SQL_PARTITION_APPLIED = "sql_partition_applied"
SQL_ROLLBACK_INTENT = "sql_rollback_intent"
SQL_PARTITION_ROLLED_BACK = "sql_partition_rolled_back"
SQL_ROLLBACK_SCRIPT = "sql_rollback_script"
#: Where a dataset version's branch publishes its Iceberg table (`tables/iceberg_publication.py`).
TABLE_PUBLICATION_RECORDED = "table_publication_recorded"


@dataclass(frozen=True)
class CommittedVersion:
    """A version of a partition as its `partition_committed` event recorded it."""

    version: int
    manifest_checksum: str
    event: Mapping[str, Any]
    previous_version: int | None
    previous_manifest_checksum: str | None

    @property
    def event_hash(self) -> str:
        return str(self.event["chain"]["event_hash"])

    @property
    def run_id(self) -> str | None:
        return self.event.get("run_id")


@dataclass(frozen=True)
class CommitIntent:
    """`partition_commit_intent` for one partition: `manifest_checksum` is about to replace
    `previous_manifest_checksum` (None: no commit point yet) as the commit point."""

    version: int
    manifest_checksum: str
    previous_version: int | None
    previous_manifest_checksum: str | None
    run_id: str | None
    seq: int


@dataclass(frozen=True)
class RollbackIntent:
    """`partition_rollback_intent` for one partition: version `version` (`manifest_checksum`) is about
    to be undone, restoring `restore_version` (`restore_manifest_checksum`), or removing the commit
    point when both are None."""

    version: int
    manifest_checksum: str
    restore_version: int | None
    restore_manifest_checksum: str | None
    run_id: str | None
    reason: str | None
    seq: int


@dataclass
class PartitionHistory:
    """One partition key's history on the chain."""

    key: str
    versions: dict[int, CommittedVersion] = field(default_factory=dict)
    current: int | None = None
    #: "committed" or "rolled_back": the type of the last completion event for the key.
    last_word: str | None = None
    #: The last completion event for the key.
    last_event: Mapping[str, Any] | None = None
    #: The intent recorded after the last completion event, if any (a crash may have stopped there).
    open_intent: CommitIntent | RollbackIntent | None = None
    #: The highest version number ever committed: never used again. (An intent whose commit never
    #: happened does not use up its number: the next attempt commits under it, as an uninterrupted
    #: run would have.)
    max_version: int = 0
    #: The events naming this key, in chain order.
    events: list[Mapping[str, Any]] = field(default_factory=list)

    @property
    def current_checksum(self) -> str | None:
        """The manifest checksum the commit point must have (None: no commit point)."""
        return None if self.current is None else self.versions[self.current].manifest_checksum

    @property
    def current_version(self) -> CommittedVersion | None:
        return None if self.current is None else self.versions[self.current]

    def commits_of(self, manifest_checksum: str) -> list[CommittedVersion]:
        return [v for v in self.versions.values() if v.manifest_checksum == manifest_checksum]

    def undone_versions(self) -> set[int]:
        """The versions a rollback of this partition undid (its `partition_rolled_back` events)."""
        return {
            e["partition"]["version"]
            for e in self.events
            if e.get("event_type") == PARTITION_ROLLED_BACK and isinstance(e.get("partition"), dict)
        }

    def lineage(self, version: int | None) -> list[int]:
        """`version` and every version it replaced, newest first, as far as the chain committed them:
        what rollbacks from `version` on could make current again."""
        found: list[int] = []
        while version is not None and version not in found and version in self.versions:
            found.append(version)
            version = self.versions[version].previous_version
        return found

    def committed_file_names(self, version: int) -> set[str]:
        """The data file names (`part-<hex>.parquet`) the commit event of `version` names."""
        tables = self.versions[version].event.get("tables")
        return {name for name in tables if isinstance(name, str)} if isinstance(tables, Mapping) else set()


#: `sql_apply_intent.journal_scope` of intents whose run files its journal entries under
#: `journal_key_of` (`ChainState.sql_journal_key`); intents without it are older.
JOURNAL_SCOPE = "first_intent"


def journal_key_of(run_id: str, first_intent_hash: str) -> str:
    """A run's journal key in a table: its id and the event hash of its first apply intent into it
    (a run id never holds `@`)."""
    return f"{run_id}@{first_intent_hash}"


@dataclass
class SqlApply:
    """One apply of a partition into a SQL table: its intent, and the event that completed it
    (`applied`) or undid it (`rolled_back`), when there is one."""

    run_id: str
    intent_seq: int
    intent: Mapping[str, Any]
    applied: Mapping[str, Any] | None = None
    rolled_back: Mapping[str, Any] | None = None

    @property
    def status(self) -> str:
        """open (interrupted or running), applied or rolled_back."""
        if self.rolled_back is not None:
            return "rolled_back"
        return "open" if self.applied is None else "applied"


@dataclass
class SqlPartitionHistory:
    """One partition key's applies into one SQL table (`target`), in chain order."""

    target: str
    key: str
    applies: list[SqlApply] = field(default_factory=list)
    #: The rollback intent recorded for an apply of this partition and not completed yet (event, seq).
    open_rollback: tuple[Mapping[str, Any], int] | None = None
    events: list[Mapping[str, Any]] = field(default_factory=list)

    def apply_at(self, intent_seq: int) -> SqlApply | None:
        return next((a for a in self.applies if a.intent_seq == intent_seq), None)

    @property
    def open_apply(self) -> SqlApply | None:
        """The apply whose intent is neither completed nor undone."""
        return next((a for a in self.applies if a.status == "open"), None)

    @property
    def current(self) -> SqlApply | None:
        """The newest apply completed and not undone."""
        return next((a for a in reversed(self.applies) if a.status == "applied"), None)


@dataclass
class ChainState:
    """A replayed chain: partition histories, events of other types, and inconsistencies."""

    partitions: dict[str, PartitionHistory] = field(default_factory=dict)
    #: SQL table targets: (target table, partition key) -> its applies.
    sql: dict[tuple[str, str], SqlPartitionHistory] = field(default_factory=dict)
    other: list[Mapping[str, Any]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    length: int = 0
    head_hash: str | None = None

    def partition(self, key: str) -> PartitionHistory:
        history = self.partitions.get(key)
        if history is None:
            history = self.partitions[key] = PartitionHistory(key)
        return history

    def get(self, key: str) -> PartitionHistory | None:
        return self.partitions.get(key)

    def run_ids(self) -> set[str]:
        """Every run id a partition event names."""
        return {
            str(e["run_id"])
            for h in self.partitions.values()
            for e in h.events
            if isinstance(e.get("run_id"), str)
        }

    def sql_partition(self, target: str, key: str) -> SqlPartitionHistory:
        history = self.sql.get((target, key))
        if history is None:
            history = self.sql[(target, key)] = SqlPartitionHistory(target, key)
        return history

    def sql_run_ids(self) -> set[str]:
        """Every run id an apply into a SQL table names."""
        return {a.run_id for h in self.sql.values() for a in h.applies}

    def sql_undone(self, target: str, run_id: str) -> set[tuple[str, int]]:
        """(partition key, intent seq) of every apply of `run_id` into `target` the chain says was
        rolled back: the only applies whose journal entries are no longer live (a `pcbo_rollbacks`
        row the chain has no rollback for undoes nothing)."""
        return {
            (h.key, a.intent_seq)
            for (t, _), h in self.sql.items()
            if t == target
            for a in h.applies
            if a.run_id == run_id and a.rolled_back is not None
        }

    def sql_journal_key(self, target: str, run_id: str) -> str | None:
        """The key the journal in `target` files `run_id`'s entries, checkpoints and rollback markers
        under (its `run_id` column), or None when the chain has no apply of the run into it (no
        entries of this chain's yet): `<runId>@<event hash of the run's first sql_apply_intent into
        the table>` — a position on this chain, so two deployments (two chains) writing one table
        with one run id never read or undo each other's — or the bare run id when that intent was
        recorded before journals were keyed by chain (no `journal_scope`)."""
        first = min(
            (a for (t, _), h in self.sql.items() if t == target for a in h.applies if a.run_id == run_id),
            key=lambda a: a.intent_seq,
            default=None,
        )
        if first is None:
            return None
        if first.intent.get("journal_scope") != JOURNAL_SCOPE:
            return run_id
        return journal_key_of(run_id, str(first.intent["chain"]["event_hash"]))

    @property
    def head(self) -> tuple[int, str] | None:
        """(seq, event hash) of the last event replayed; None before any."""
        return None if self.length == 0 or self.head_hash is None else (self.length - 1, self.head_hash)

    def add(self, event: Mapping[str, Any]) -> None:
        """Replay one more event (the next in seq order)."""
        self.length += 1
        chain = event.get("chain") if isinstance(event, Mapping) else None
        seq = chain.get("seq") if isinstance(chain, Mapping) else None
        self.head_hash = chain.get("event_hash") if isinstance(chain, Mapping) else None
        kind = event.get("event_type")
        where = f"seq {seq}"
        try:
            if kind == PARTITION_COMMIT_INTENT:
                self._commit_intent(event, seq if isinstance(seq, int) else -1, where)
            elif kind == PARTITION_COMMITTED:
                self._committed(event, where)
            elif kind == PARTITION_ROLLBACK_INTENT:
                self._rollback_intent(event, seq if isinstance(seq, int) else -1, where)
            elif kind == PARTITION_ROLLED_BACK:
                self._rolled_back(event, where)
            elif kind == PARTITION_RESTORED:
                self.partition(_text(event["partition"]["key"])).events.append(event)
            elif kind == SQL_APPLY_INTENT:
                self._sql_apply_intent(event, seq if isinstance(seq, int) else -1, where)
            elif kind == SQL_PARTITION_APPLIED:
                self._sql_applied(event, where)
            elif kind == SQL_ROLLBACK_INTENT:
                self._sql_rollback_intent(event, seq if isinstance(seq, int) else -1, where)
            elif kind == SQL_PARTITION_ROLLED_BACK:
                self._sql_rolled_back(event, where)
            else:
                self.other.append(event)
        except (KeyError, TypeError, ValueError) as exc:
            self.findings.append(f"{where}: {kind} event is malformed: {exc!r}")

    # -- the four partition events -------------------------------------------------------------

    def _commit_intent(self, event: Mapping[str, Any], seq: int, where: str) -> None:
        for entry in event["partitions"]:
            history = self.partition(_text(entry["key"]))
            history.events.append(event)
            intent = CommitIntent(
                version=_int(entry["version"]),
                manifest_checksum=_text(entry["manifest_checksum"]),
                previous_version=_optional_int(entry.get("previous_version")),
                previous_manifest_checksum=_optional_text(entry.get("previous_manifest_checksum")),
                run_id=_optional_text(event.get("run_id")),
                seq=seq,
            )
            if intent.version <= history.max_version:
                self.findings.append(
                    f"{where}: intent for {history.key} version {intent.version} reuses a version number "
                    f"(the chain already committed version {history.max_version})"
                )
            if (intent.previous_version, intent.previous_manifest_checksum) != (
                history.current,
                history.current_checksum,
            ):
                self.findings.append(
                    f"{where}: intent for {history.key} replaces version {intent.previous_version}, "
                    f"but the chain's current version is {history.current}"
                )
            history.open_intent = intent

    def _committed(self, event: Mapping[str, Any], where: str) -> None:
        part = event["partition"]
        history = self.partition(_text(part["key"]))
        history.events.append(event)
        version = _int(part["version"])
        checksum = _text(event["manifest"]["checksum"])
        previous = event.get("previous")
        if isinstance(previous, Mapping):
            prev_version = _optional_int(previous.get("version"))
            prev_checksum = _optional_text(previous.get("manifest_checksum"))
        else:  # an event written before commits named what they replace: it replaced the current one
            prev_version, prev_checksum = history.current, history.current_checksum
        if history.commits_of(checksum):
            self.findings.append(
                f"{where}: a second partition_committed for {history.key} manifest {checksum}"
            )
        if version in history.versions:
            self.findings.append(f"{where}: {history.key} version {version} is committed twice")
        if (prev_version, prev_checksum) != (history.current, history.current_checksum):
            self.findings.append(
                f"{where}: {history.key} version {version} replaces version {prev_version}, but the "
                f"chain's current version is {history.current}"
            )
        history.versions[version] = CommittedVersion(version, checksum, event, prev_version, prev_checksum)
        history.current = version
        history.max_version = max(history.max_version, version)
        history.last_word, history.last_event = "committed", event
        # The open intent is completed by this event (or, when it named another manifest, abandoned).
        history.open_intent = None

    def _rollback_intent(self, event: Mapping[str, Any], seq: int, where: str) -> None:
        for entry in event["partitions"]:
            history = self.partition(_text(entry["key"]))
            history.events.append(event)
            intent = RollbackIntent(
                version=_int(entry["version"]),
                manifest_checksum=_text(entry["manifest_checksum"]),
                restore_version=_optional_int(entry.get("restore_version")),
                restore_manifest_checksum=_optional_text(entry.get("restore_manifest_checksum")),
                run_id=_optional_text(event.get("run_id")),
                reason=_optional_text(event.get("reason")),
                seq=seq,
            )
            if (intent.version, intent.manifest_checksum) != (history.current, history.current_checksum):
                self.findings.append(
                    f"{where}: rollback intent for {history.key} undoes version {intent.version}, but the "
                    f"chain's current version is {history.current}"
                )
            self._check_restorable(history, intent.restore_version, intent.restore_manifest_checksum, where)
            history.open_intent = intent

    def _rolled_back(self, event: Mapping[str, Any], where: str) -> None:
        part = event["partition"]
        history = self.partition(_text(part["key"]))
        history.events.append(event)
        version = _int(part["version"])
        checksum = _text(event["undone_manifest_checksum"])
        restored = _optional_int(event.get("restored_version"))
        if (version, checksum) != (history.current, history.current_checksum):
            self.findings.append(
                f"{where}: {history.key} rollback undoes version {version}, but the chain's current "
                f"version is {history.current}"
            )
        restored_checksum = _optional_text(event.get("restored_manifest_checksum"))
        if restored is not None and restored_checksum is None and restored in history.versions:
            restored_checksum = history.versions[restored].manifest_checksum
        self._check_restorable(history, restored, restored_checksum, where)
        history.current = restored if restored in history.versions else None
        history.last_word, history.last_event = "rolled_back", event
        history.open_intent = None

    # -- the SQL target events ------------------------------------------------------------------------

    def _sql_apply_intent(self, event: Mapping[str, Any], seq: int, where: str) -> None:
        history = self.sql_partition(_text(event["target"]), _text(event["partition"]["key"]))
        history.events.append(event)
        run_id = _text(event["run_id"])
        if history.open_apply is not None:
            self.findings.append(
                f"{where}: apply intent for {history.key} of {history.target} while run "
                f"{history.open_apply.run_id}'s apply (seq {history.open_apply.intent_seq}) is still open"
            )
        history.applies.append(SqlApply(run_id, seq, event))

    def _sql_applied(self, event: Mapping[str, Any], where: str) -> None:
        history = self.sql_partition(_text(event["target"]), _text(event["partition"]["key"]))
        history.events.append(event)
        apply = history.apply_at(_int(event["intent_seq"]))
        if apply is None or apply.status != "open" or apply.run_id != event.get("run_id"):
            self.findings.append(
                f"{where}: {history.key} of {history.target} applied without an open intent of its run "
                f"at seq {event.get('intent_seq')}"
            )
            return
        apply.applied = event

    def _sql_rollback_intent(self, event: Mapping[str, Any], seq: int, where: str) -> None:
        target = _text(event["target"])
        for entry in event["partitions"]:
            history = self.sql_partition(target, _text(entry["key"]))
            history.events.append(event)
            apply = history.apply_at(_int(entry["intent_seq"]))
            if apply is None or apply.status == "rolled_back" or apply.run_id != event.get("run_id"):
                self.findings.append(
                    f"{where}: rollback intent for {history.key} of {target} names an apply "
                    f"(seq {entry.get('intent_seq')}) of its run that is not there or already undone"
                )
            history.open_rollback = (event, seq)

    def _sql_rolled_back(self, event: Mapping[str, Any], where: str) -> None:
        history = self.sql_partition(_text(event["target"]), _text(event["partition"]["key"]))
        history.events.append(event)
        apply = history.apply_at(_int(event["intent_seq"]))
        if apply is None or apply.status == "rolled_back" or history.open_rollback is None:
            self.findings.append(
                f"{where}: {history.key} of {history.target} rolled back without a rollback intent for "
                f"its apply at seq {event.get('intent_seq')}"
            )
        if apply is not None:
            apply.rolled_back = event
        history.open_rollback = None

    def _check_restorable(
        self, history: PartitionHistory, version: int | None, checksum: str | None, where: str
    ) -> None:
        if version is None:
            if checksum is not None:
                self.findings.append(f"{where}: {history.key} restores no version but names a checksum")
            return
        known = history.versions.get(version)
        if known is None:
            self.findings.append(f"{where}: {history.key} restores version {version}, never committed")
        elif checksum is not None and known.manifest_checksum != checksum:
            self.findings.append(
                f"{where}: {history.key} restores version {version} as {checksum}, committed as "
                f"{known.manifest_checksum}"
            )


def replay(events: Iterable[Mapping[str, Any]]) -> ChainState:
    """Replay a chain's events in order (see the module doc)."""
    state = ChainState()
    for event in events:
        state.add(event)
    return state


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _optional_int(value: object) -> int | None:
    return None if value is None else _int(value)


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)
