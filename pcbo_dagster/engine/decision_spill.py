"""A streamed source's per-record state on local disk, so that memory stays bounded whatever the
source size.

Pass 1 over a record file (`request_loading`) hands each batch to `DecisionSpill.add_batch`, which
keeps nothing of it in memory: for every record it writes one row to a temporary SQLite database —
input position, partition (null when unplaced), id, raw digest, the reasons that need no other
record, the source's locator to read it again, and its two instants — and for every unplaced record
its entry. SQLite then does what needs all records at once, spilling its sorts to disk, in bounded
memory: the digests in byte order (the plan hash), the ids seen more than once (DUPLICATE_ID), and
each partition's rows (an index on the partition). A partition's decision is made from its rows by
the same `core.decisions.partition_decision` the in-memory path uses, when it is asked for; so only
the partitions being written are ever in memory.

The database lives in a temporary directory under `PCBO_SPILL_DIR` (default: the system's temporary
directory), named `pcbo-spill-<pid>-*`, removed when the spill is closed or garbage collected, or when
the process exits; one that a process killed outright left behind is removed by the next spill made
there once that pid is no longer running. Its page cache is capped at `SPILL_CACHE_KIB`; SQLite's
own sort files go where it puts temporary files (`SQLITE_TMPDIR`, `TMPDIR`, else /var/tmp or /tmp).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np
import pyarrow as pa

from pcbo_dagster.core.decisions import (
    DecisionHasher,
    Decisions,
    PartitionDecision,
    RecordColumns,
    make_totals,
    out_of_window_detail,
    partition_decision,
    record_masks,
    sort_placed,
    unplaced_entry,
)
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.plan import Plan
from pcbo_dagster.core.record_table import SchemaBuilder
from pcbo_dagster.io.env_vars import plain_path
from pcbo_dagster.io.redaction import scrub_text

#: SQLite page cache of the spill (KiB); sorts beyond it go to temporary files beside the database.
SPILL_CACHE_KIB = 32_768
_FETCH = 65_536  # rows taken from a cursor at a time

_SCHEMA = """
CREATE TABLE records (
    idx INTEGER PRIMARY KEY,  -- input position
    pidx INTEGER,             -- partition index; null when unplaced
    id TEXT,                  -- the id where it is a non-empty string (DUPLICATE_ID), else null
    digest BLOB NOT NULL,     -- SHA-256 of JCS(record), raw
    mask INTEGER NOT NULL,    -- reason bits but DUPLICATE_ID
    locator INTEGER NOT NULL, -- what the source reads the record back by
    occurred INTEGER,         -- occurredAt, microseconds
    retention INTEGER         -- retentionExpiresAt, microseconds
);
CREATE TABLE unplaced (
    idx INTEGER PRIMARY KEY,
    id TEXT,                  -- the id where it is a string (an empty one too), else null
    detail TEXT               -- why it is invalid; null: out of the window
);
"""


#: Where spills are made (`spill_root`).
SPILL_DIR_VARIABLE = "PCBO_SPILL_DIR"


def spill_root() -> str | None:
    """Where spills are made: `PCBO_SPILL_DIR` (`~` expanded, as `Settings.own_paths` reads it), or
    None for the system's temporary directory. A value with surrounding white space or control
    characters is `InvalidInput` naming the variable."""
    root = plain_path(SPILL_DIR_VARIABLE, os.environ.get(SPILL_DIR_VARIABLE) or None)
    return None if root is None else os.path.expanduser(root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_spills(root: str | None) -> list[str]:
    """Remove the spill directories under `root` (None: the system's temporary directory) whose
    process (the pid in their name, `pcbo-spill-<pid>-*`) is no longer running: what a process killed
    outright left behind. Returns the paths removed."""
    base = root or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        parts = name.split("-")
        if len(parts) < 4 or parts[:2] != ["pcbo", "spill"] or not parts[2].isdigit():
            continue
        if int(parts[2]) != os.getpid() and not _alive(int(parts[2])):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed.append(os.path.join(base, name))
    return removed


def _close(connection: sqlite3.Connection, directory: str) -> None:
    try:
        connection.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class DecisionSpill:
    """Records' decision state on disk: filled by `add_batch`, then `finish`, then read."""

    def __init__(self, plan: Plan, existing_ids: list[str]) -> None:
        """`plan`: the request's partitions and policies (its hash is not needed, nor used)."""
        self._window = plan
        self._existing = existing_ids
        self._outside = out_of_window_detail(plan)
        root = spill_root()
        if root is not None:
            try:
                os.makedirs(root, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise InvalidInput(
                    SPILL_DIR_VARIABLE, f"{scrub_text(repr(root))} is not a directory"
                ) from None
        remove_stale_spills(root)
        self.directory = tempfile.mkdtemp(prefix=f"pcbo-spill-{os.getpid()}-", dir=root)
        self._db = sqlite3.connect(
            os.path.join(self.directory, "spill.sqlite"), check_same_thread=False, isolation_level=None
        )
        self._finalizer = weakref.finalize(self, _close, self._db, self.directory)
        self._lock = threading.Lock()
        for pragma in (
            "journal_mode = OFF",
            "synchronous = OFF",
            "locking_mode = EXCLUSIVE",
            "temp_store = FILE",
            f"cache_size = -{SPILL_CACHE_KIB}",
        ):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(_SCHEMA)
        self._db.execute("BEGIN")
        self.count = 0
        self.placed = 0
        self.invalid = 0
        self.out_of_window = 0
        self._finished = False
        #: The JSON types of the fields of the records added but for DUPLICATE_ID (the run's schema
        #: without a re-read, when `schema_exact`).
        self.schema = SchemaBuilder()
        self.schema_exact = False

    def close(self) -> None:
        self._finalizer()

    # -- pass 1 ------------------------------------------------------------------------------------

    def add_batch(
        self, records: list[Any], digests: bytes, locators: np.ndarray, cols: RecordColumns
    ) -> None:
        """One batch of records, in input order: the records, their raw digests (32 bytes each), the
        locators the source reads them back by, and their decision columns."""
        n = len(cols)
        first = self.count
        masks = record_masks(self._window, cols, self._existing)
        placed = masks.placed
        # The run's schema over the records added unless DUPLICATE_ID omits them (see `finish`).
        self.schema.add([records[i] for i in np.flatnonzero(placed & (masks.mask == 0)).tolist()])
        idx = range(first, first + n)
        pidx = [p if ok else None for p, ok in zip(masks.pidx.tolist(), placed.tolist(), strict=True)]
        digest_list = [digests[i : i + 32] for i in range(0, 32 * n, 32)]
        self._db.executemany(
            "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            zip(
                idx,
                pidx,
                masks.ids.to_pylist(),
                digest_list,
                masks.mask.tolist(),
                np.asarray(locators, dtype=np.int64).tolist(),
                cols.occ_us.to_pylist(),
                cols.ret_us.to_pylist(),
                strict=True,
            ),
        )
        unplaced = np.flatnonzero(~placed)
        if len(unplaced):
            take = pa.array(unplaced, pa.int64())
            details = cols.detail.take(take).to_pylist()
            self._db.executemany(
                "INSERT INTO unplaced VALUES (?, ?, ?)",
                zip((first + unplaced).tolist(), cols.id_str.take(take).to_pylist(), details, strict=True),
            )
            invalid = sum(d is not None for d in details)
            self.invalid += invalid
            self.out_of_window += len(unplaced) - invalid
        self.count += n
        self.placed += int(placed.sum())

    def finish(self) -> None:
        """After the last batch: index the partitions and find the ids seen more than once."""
        db = self._db
        db.execute("COMMIT")
        db.execute("CREATE INDEX records_by_partition ON records (pidx)")
        db.execute(
            """CREATE TABLE repeated AS
               SELECT id, COUNT(DISTINCT digest) AS kinds, MIN(idx) AS first
               FROM records WHERE id IS NOT NULL GROUP BY id HAVING COUNT(*) > 1"""
        )
        db.execute("CREATE UNIQUE INDEX repeated_by_id ON repeated (id)")
        (differing,) = db.execute(
            """SELECT COUNT(*) FROM records r JOIN repeated d ON d.id = r.id
               WHERE r.pidx IS NOT NULL AND r.mask = 0 AND d.kinds > 1"""
        ).fetchone()
        # `schema` saw every record added but for DUPLICATE_ID: exact unless some of those are copies
        # that differ (all omitted); equal copies left out have the kept copy's types.
        self.schema_exact = differing == 0
        self._finished = True

    # -- reading -----------------------------------------------------------------------------------

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> Iterator[list[tuple[Any, ...]]]:
        """Rows of a query, `_FETCH` at a time. The connection is used under the spill's lock, taken
        for each step and never held across a `yield`: queries may interleave, from any thread."""
        assert self._finished
        with self._lock:
            cursor = self._db.execute(sql, args)
        while True:
            with self._lock:
                rows = cursor.fetchmany(_FETCH)
            if not rows:
                return
            yield rows

    def sorted_digests(self) -> Iterator[np.ndarray]:
        """Every record's raw digest in byte order, as (k, 32) uint8 chunks (the plan hash)."""
        for rows in self._rows("SELECT digest FROM records ORDER BY digest"):
            yield np.frombuffer(b"".join(r[0] for r in rows), dtype=np.uint8).reshape(len(rows), 32)

    def partition(self, plan: Plan, index: int) -> tuple[PartitionDecision, list[dict[str, Any]]]:
        """Partition `index`'s decision (DUPLICATE_ID included) and its blocking breaches."""
        rows: list[tuple[Any, ...]] = []
        for chunk in self._rows(
            """SELECT r.idx, r.id, r.mask | (CASE WHEN d.id IS NOT NULL AND (d.kinds > 1 OR r.idx != d.first)
                      THEN 16 ELSE 0 END), r.locator, r.occurred, r.retention, r.digest
               FROM records r LEFT JOIN repeated d ON d.id = r.id WHERE r.pidx = ?""",
            (index,),
        ):
            rows.extend(chunk)
        idx, ids, masks, locators, occurred, retention, digests = (
            zip(*rows, strict=True) if rows else ([],) * 7
        )
        table = sort_placed(
            pa.table(
                {
                    "pidx": pa.array(np.full(len(rows), index, dtype=np.int64)),
                    "id": pa.array(ids, pa.string()),
                    "mask": pa.array(masks, pa.int32()),
                    "row": pa.array(np.arange(len(rows), dtype=np.int64)),
                }
            )
        )
        del rows
        order = table["row"].to_numpy()
        return partition_decision(
            plan.partitions[index],
            table["id"].to_pylist(),
            table["mask"].to_numpy(),
            np.asarray(idx, dtype=np.int64)[order],
            np.asarray(locators, dtype=np.int64)[order],
            np.asarray(occurred, dtype=np.int64)[order],
            pa.array(retention, pa.int64()).take(pa.array(order)),
            plan.policies.on_violation,
            [bytes(digests[i]) for i in order.tolist()],
        )

    def unplaced_entries(self) -> Iterator[dict[str, Any]]:
        """The unplaced entries, by input index."""
        for rows in self._rows("SELECT idx, id, detail FROM unplaced ORDER BY idx"):
            for index, entry_id, detail in rows:
                yield unplaced_entry(index, entry_id, detail, self._outside)

    def decisions(self, plan: Plan) -> Decisions:
        """The decisions under `plan` (the same plan with its hash): one pass over the partitions for
        the totals, breaches and decision hash; partitions and unplaced entries are read again when
        asked for."""
        hasher = DecisionHasher()
        counts: list[dict[str, Any]] = []
        breaches: list[dict[str, Any]] = []
        for index in range(len(plan.partitions)):
            decision, blocking = self.partition(plan, index)
            hasher.add_partition(decision)
            counts.append(decision.counts)
            breaches.extend(blocking)
            del decision
        hasher.start_unplaced(plan.plan_hash)
        for entry in self.unplaced_entries():
            hasher.add_unplaced(entry)
        return Decisions(
            plan=plan,
            partitions=SpilledPartitions(self, plan),
            unplaced=SpilledUnplaced(self),
            totals=make_totals(self.count, self.placed, counts, self.invalid, self.out_of_window),
            breaches=breaches,
            decision_hash=hasher.result(),
        )


class SpilledPartitions(Sequence[PartitionDecision]):
    """A plan's partition decisions, each read from the spill when it is asked for (not kept)."""

    def __init__(self, spill: DecisionSpill, plan: Plan) -> None:
        self.spill = spill
        self._plan = plan

    def __len__(self) -> int:
        return len(self._plan.partitions)

    @overload
    def __getitem__(self, item: int) -> PartitionDecision: ...

    @overload
    def __getitem__(self, item: slice) -> list[PartitionDecision]: ...

    def __getitem__(self, item: int | slice) -> PartitionDecision | list[PartitionDecision]:
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        if item < 0:
            item += len(self)
        if not 0 <= item < len(self):
            raise IndexError(item)
        return self.spill.partition(self._plan, item)[0]

    def __iter__(self) -> Iterator[PartitionDecision]:
        for i in range(len(self)):
            yield self[i]


class SpilledUnplaced(Sequence[dict[str, Any]]):
    """The unplaced entries, read from the spill when iterated."""

    def __init__(self, spill: DecisionSpill) -> None:
        self._spill = spill

    def __len__(self) -> int:
        return self._spill.invalid + self._spill.out_of_window

    def __getitem__(self, item: Any) -> Any:
        entries = list(self._spill.unplaced_entries())
        return entries[item]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._spill.unplaced_entries()
