"""The links of a ledger history as the lake holds it: each ledger's `previousLedgerHash` must be the
`ledgerHash` of the ledger before it, wherever the two lie — in one partition, or in two partitions
written by different runs from archives that may not be the same history (a run checks the links of
the ledgers it reads, not the link to a ledger an earlier run loaded).

`LedgerLinks.add` takes each table of a partition with the ledger columns (`ledgerSequence`,
`ledgerHash`, `previousLedgerHash`: a ledger archive's records, `sources/ledger_decoding.py`), checks
the links inside it and keeps only its first and last ledgers; `breaks` then checks the links between
partitions. A ledger absent from the lake (a gap, a record a policy omitted) links nothing: the
ledgers on either side of it are not compared. Tables without those columns are not ledgers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

SEQUENCE, HASH, PREVIOUS = "ledgerSequence", "ledgerHash", "previousLedgerHash"


@dataclass
class LedgerLinks:
    #: (sequence, previousLedgerHash, where) of each table's first ledger; (sequence, ledgerHash,
    #: where) of its last.
    firsts: list[tuple[int, str, str]] = field(default_factory=list)
    lasts: list[tuple[int, str, str]] = field(default_factory=list)
    found: list[tuple[str, str]] = field(default_factory=list)

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
        self.firsts.append((sequences[0], previous[0], where))
        self.lasts.append((sequences[-1], hashes[-1], where))

    def breaks(self) -> list[tuple[str, str]]:
        """(where, detail) of every link found broken: inside the tables added, then between them."""
        last_of = {sequence: (digest, where) for sequence, digest, where in self.lasts}
        for sequence, previous, where in sorted(self.firsts):
            before = last_of.get(sequence - 1)
            if before is not None and before[0] != previous:
                self._break(sequence, previous, before[0], where, before[1])
        return self.found

    def _break(self, sequence: int, previous: str | None, digest: str | None, where: str, at: str) -> None:
        self.found.append(
            (
                where,
                f"ledger {sequence}'s previousLedgerHash {previous} is not the hash of ledger "
                f"{sequence - 1} ({digest}, in {at}): the lake holds no single ledger history",
            )
        )
