"""The links of a ledger history as the lake holds it: each ledger's `previousLedgerHash` must be the
`ledgerHash` of the ledger before it, wherever the two lie — in one partition, or in two partitions
written by different runs from archives that may not be the same history (a run checks the links of
the ledgers it reads, not the link to a ledger an earlier run loaded).

`LedgerLinks.add` takes each table of a partition with the ledger columns (`ledgerSequence`,
`ledgerHash`, `previousLedgerHash`: a ledger archive's records, `sources/ledger_decoding.py`), checks
the links inside it and keeps only its first and last ledgers; `breaks` then checks the links between
partitions. A ledger absent from the lake (a gap, a record a policy omitted) links nothing: the
ledgers on either side of it are not compared. Where partitions overlap (runs partitioned
differently), a ledger held twice must have one hash (`shared`, `held`). Tables without those
columns are not ledgers.

`anchored(sequence, digest)`: the ledgers linked, without a gap or a broken link, up to a ledger
whose hash an auditor trusts (`pcbo verify --trusted-ledger`): those are the network's if that
ledger is.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pcbo_dagster.core.request_model import LEDGER_HASH_PATTERN, MAX_LEDGER_SEQUENCE, NAME_PATTERN

SEQUENCE, HASH, PREVIOUS = "ledgerSequence", "ledgerHash", "previousLedgerHash"

_NAME = NAME_PATTERN[1:-1]
_TRUSTED = re.compile(
    rf"(?P<dataset>{_NAME})/(?P<label>{_NAME}):(?P<sequence>[1-9][0-9]{{0,9}}):"
    rf"(?P<hash>{LEDGER_HASH_PATTERN[1:-1]})",
    re.ASCII,
)


@dataclass(frozen=True)
class LedgerAnchor:
    """A ledger of a dataset version whose hash an auditor trusts (taken from the network)."""

    dataset: str
    version_label: str
    sequence: int
    hash: str

    @classmethod
    def parse(cls, text: str) -> LedgerAnchor:
        """`DATASET/VERSION:SEQUENCE:HASH` (the hash 64 lowercase hex digits); `ValueError` saying the
        form otherwise."""
        match = _TRUSTED.fullmatch(text)
        if match is None or int(match["sequence"]) > MAX_LEDGER_SEQUENCE:
            raise ValueError(
                "give DATASET/VERSION:SEQUENCE:HASH, e.g. ledgers/v1:641:<the ledger's hash, 64 "
                "lowercase hex digits>"
            )
        return cls(match["dataset"], match["label"], int(match["sequence"]), match["hash"])

    @classmethod
    def parse_all(cls, texts: Iterable[str]) -> list[LedgerAnchor]:
        """Each of `texts` parsed (`parse`); `ValueError` naming the first that is not one."""
        anchors = []
        for text in texts:
            try:
                anchors.append(cls.parse(text))
            except ValueError as exc:
                raise ValueError(f"{text!r}: {exc}") from None
        return anchors


@dataclass
class LedgerLinks:
    #: (sequence, previousLedgerHash, where) of each table's first ledger; (sequence, ledgerHash,
    #: where) of its last.
    firsts: list[tuple[int, str, str]] = field(default_factory=list)
    lasts: list[tuple[int, str, str]] = field(default_factory=list)
    found: list[tuple[str, str]] = field(default_factory=list)
    #: Runs of linked ledgers, each inside one table: (first, last, first's previousLedgerHash,
    #: last's ledgerHash).
    spans: list[tuple[int, int, str, str]] = field(default_factory=list)
    #: The sequences whose copies to keep (`copies_of`): each copy the tables hold, as (its hash,
    #: where, the span holding it). A ledger may be held twice (partitions of two runs partitioned
    #: differently overlap).
    watch: frozenset[int] = frozenset()
    copies_of: dict[int, list[tuple[str, str, tuple[int, int, str, str]]]] = field(default_factory=dict)
    #: The ledger ranges more than one table may hold (`shared_ranges`), and each hash held for a
    #: ledger in them, with where it was first seen: two hashes for one ledger are two histories.
    shared: list[tuple[int, int]] = field(default_factory=list)
    held: dict[int, dict[str, str]] = field(default_factory=dict)
    #: With `watch`: which rows of a table (sorted by sequence) their own XDR gives as they stand (the
    #: caller walks it): only those are spans and copies. The columns alone are whatever a source
    #: said; only a ledger archive's run checked them against the ledger.
    derives: Callable[[pa.Table], list[bool]] | None = None

    def add(self, table: pa.Table, where: str) -> None:
        """Check the links inside `table` (a partition's data file, `where`) and keep its ends."""
        if not {SEQUENCE, HASH, PREVIOUS} <= set(table.column_names) or table.num_rows == 0:
            return
        columns = table.select([SEQUENCE, HASH, PREVIOUS])
        if not (
            pa.types.is_integer(columns[SEQUENCE].type)
            and pa.types.is_string(columns[HASH].type)
            and pa.types.is_string(columns[PREVIOUS].type)
        ):
            return
        columns = columns.filter(pc.is_valid(columns[SEQUENCE])).sort_by(SEQUENCE)
        if columns.num_rows == 0:
            return
        sequences = columns[SEQUENCE].to_pylist()
        hashes, previous = columns[HASH].to_pylist(), columns[PREVIOUS].to_pylist()
        for i in range(1, len(sequences)):
            if sequences[i] == sequences[i - 1] + 1 and previous[i] != hashes[i - 1]:
                self._break(sequences[i], previous[i], hashes[i - 1], where, where)
        if self.watch:  # (spans and copies serve `anchored` alone)
            derived = [True] * len(sequences)
            if self.derives is not None:  # (the same stable sort: the rows in the same order)
                derived = self.derives(table.filter(pc.is_valid(table[SEQUENCE])).sort_by(SEQUENCE))
            self._add_spans(sequences, hashes, previous, derived, where)
        if self.shared:
            lows = [low for low, _ in self.shared]
            for sequence, digest in zip(sequences, hashes, strict=True):
                at = bisect.bisect_right(lows, sequence) - 1
                if at >= 0 and sequence <= self.shared[at][1]:
                    self.held.setdefault(sequence, {}).setdefault(digest, where)
        self.firsts.append((sequences[0], previous[0], where))
        self.lasts.append((sequences[-1], hashes[-1], where))

    def _add_spans(
        self, sequences: list[int], hashes: list[str], previous: list[str], derived: list[bool], where: str
    ) -> None:
        """The runs of linked rows its XDR gives (`derives`), and the copies of watched ledgers."""
        bounds: list[tuple[int, int]] = []
        start: int | None = None
        for i, sequence in enumerate(sequences):
            if not derived[i]:
                if start is not None:
                    bounds.append((start, i - 1))
                start = None
            elif start is None:
                start = i
            elif not (sequence == sequences[i - 1] + 1 and previous[i] == hashes[i - 1]):
                bounds.append((start, i - 1))
                start = i
        if start is not None:
            bounds.append((start, len(sequences) - 1))
        for low, high in bounds:
            span = (sequences[low], sequences[high], previous[low], hashes[high])
            self.spans.append(span)
            for i in range(low, high + 1):
                if sequences[i] in self.watch:
                    self.copies_of.setdefault(sequences[i], []).append((hashes[i], where, span))

    def breaks(self) -> list[tuple[str, str]]:
        """(where, detail) of every link found broken: inside the tables added, then between them."""
        last_of = {sequence: (digest, where) for sequence, digest, where in self.lasts}
        for sequence, previous, where in sorted(self.firsts):
            before = last_of.get(sequence - 1)
            if before is not None and before[0] != previous:
                self._break(sequence, previous, before[0], where, before[1])
        reported: set[tuple[str, str]] = set()
        for sequence, copies in sorted(self.held.items()):
            (one, at), *others = copies.items()
            for other, where in others:
                if (at, where) not in reported:  # (the first ledger the two disagree on)
                    reported.add((at, where))
                    self.found.append(
                        (
                            where,
                            f"ledger {sequence}'s hash is {other} here and {one} in {at} (partitions "
                            "overlapping): the lake holds no single ledger history",
                        )
                    )
        return self.found

    def anchored(self, sequence: int, digest: str) -> tuple[int, int] | None:
        """(first, `sequence`): the ledgers linked one to the next up to ledger `sequence` (a watched
        one) whose hash is `digest`, across tables, stopping at a gap or a broken link; None when no
        table holds it with that hash."""
        ends: dict[int, list[tuple[int, int, str, str]]] = {}
        for span in self.spans:
            ends.setdefault(span[1], []).append(span)
        firsts = []
        for held, _, holding in self.copies_of.get(sequence, []):
            if held != digest:
                continue
            first, previous = holding[0], holding[2]
            while before := [s for s in ends.get(first - 1, []) if s[3] == previous]:
                first, previous = before[0][0], before[0][2]
            firsts.append(first)
        return (min(firsts), sequence) if firsts else None

    @staticmethod
    def shared_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The ledgers (first, last; both inclusive) inside more than one of `ranges` (the partitions'
        key ranges), as sorted, disjoint runs."""
        shared: list[tuple[int, int]] = []
        reach = -1
        for low, high in sorted(ranges):
            if low <= reach:
                top = min(high, reach)
                if shared and low <= shared[-1][1] + 1:
                    shared[-1] = (shared[-1][0], max(shared[-1][1], top))
                else:
                    shared.append((low, top))
            reach = max(reach, high)
        return shared

    def _break(self, sequence: int, previous: str | None, digest: str | None, where: str, at: str) -> None:
        self.found.append(
            (
                where,
                f"ledger {sequence}'s previousLedgerHash {previous} is not the hash of ledger "
                f"{sequence - 1} ({digest}, in {at}): the lake holds no single ledger history",
            )
        )
