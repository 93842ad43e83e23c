"""Write a realistic SEP-54 ledger archive (what `ledger_benchmark.py` reads): Galexie's pubnet layout
(one ledger a file, 64,000 files a partition folder) of ledgers with full transaction sets and metas
(`pcbo_dagster_tests/realistic_ledgers.py`: ~200 transactions and ~400-470 KiB of XDR a ledger by
default). The output is deterministic: the same parameters give the same bytes (no random module,
no clock).

    python benchmarks/generate_ledger_archive.py OUT --ledgers 2048 --transactions 200 --ledgers-per-file 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pcbo_dagster_tests.realistic_ledgers import FIRST_LEDGER, RealisticArchive, write_realistic_archive  # noqa: E402


def generate(
    out: Path,
    *,
    ledgers: int,
    transactions: int,
    ledgers_per_file: int,
    version: int,
    first: int = FIRST_LEDGER,
) -> RealisticArchive:
    return write_realistic_archive(
        out,
        ledgers=ledgers,
        transactions=transactions,
        ledgers_per_file=ledgers_per_file,
        version=version,
        first=first,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="the archive's ledgers path (created)")
    parser.add_argument("--ledgers", type=int, default=2048)
    parser.add_argument("--transactions", type=int, default=200, help="transactions a ledger")
    parser.add_argument("--ledgers-per-file", type=int, default=1)
    parser.add_argument("--version", type=int, choices=(0, 1, 2), default=2, help="LedgerCloseMeta version")
    parser.add_argument("--first", type=int, default=FIRST_LEDGER, help="the first ledger's sequence")
    args = parser.parse_args()
    t0 = time.perf_counter()
    archive = generate(
        args.out,
        ledgers=args.ledgers,
        transactions=args.transactions,
        ledgers_per_file=args.ledgers_per_file,
        version=args.version,
        first=args.first,
    )
    print(
        f"wrote ledgers {archive.first}-{archive.end - 1} to {args.out}: {archive.files} files, "
        f"{archive.xdr_bytes / 2**20:.1f} MiB of XDR "
        f"({archive.xdr_bytes / args.ledgers / 1024:.0f} KiB a ledger), "
        f"{archive.stored_bytes / 2**20:.1f} MiB compressed, in {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
