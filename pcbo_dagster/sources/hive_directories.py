"""A directory of record files (hive-partitioned or not) read as one source, pruned by time.

A request's `source.uri` may name a directory (local path, `file://`, `s3://` or `gs://`) instead
of one file. Its records are the rows of every data file below it, recursively (on a local file
system through folders that are symbolic links too; a link loop is invalid input), files taken in
the order of their paths relative to the directory (sorted as strings, i.e. by code point, which is the
bytewise order of their UTF-8), each file read as `sources.streaming` reads a single file. So a
directory gives exactly the records of its files concatenated in that order, and the plan and
decision hashes are those of one file holding them.

- Skipped: any path whose relative path has a component starting with `_` or `.` (`_SUCCESS`,
  `_temporary/`, `.part-0.parquet.crc`, `.tmp`), and files whose extension is not a data format's.
  Any other path whose name is not UTF-8 (a local file system allows it), or an object key with an
  empty path component (`dir//a.jsonl`, which object store clients read as `dir/a.jsonl`), is
  invalid input naming it.
- Format: `source.format` if given (then only files of that format's extensions are read: `.jsonl`
  and `.ndjson`, `.csv`, `.parquet`, any case); otherwise inferred from the extensions, and every
  data file must have the same format (else invalid input on `source.format`).
- CSV: every file must have the same header row (an empty file, without one, is allowed), and the
  integer columns are decided over all the files read (a column has one type in the whole run).
- Hive partition values (`name=value` path components) are NOT added to the records: records are
  the files' rows as they are, and carry their own `occurredAt`. The partition values are used only
  to skip files (below).

Pruning (`prune`: opt-in in a request, a dataset config's default; only for a time request, whose
window is [start, end)): from the directory components of a file's relative path, the time
interval the file can hold is derived, and a file whose interval does not meet the window is not read
at all. Recognised keys (any case; values URL-decoded, `%3A` -> `:`), read as UTC:
- `dt` / `date`: `YYYY-MM-DD` or `YYYYMMDD` (that day), `YYYY-MM-DDTHH` or `YYYY-MM-DD HH` (that
  hour); a value with minutes (`YYYY-MM-DD[T ]HH:MM[:SS[.ffffff]]`, optional `Z`/`+hh:mm`) is taken
  as the start of its partition only, a lower bound (the width of such a partition is unknown);
- `year`, `month`, `day`, `hour` (integers): the longest chain year, year/month, year/month/day,
  year/month/day/hour, where the date keys fill in the coarser parts (`dt=2024-01-02/hour=05` is
  that hour); a finer key without the coarser ones (`hour` alone) means nothing.
Any other key is ignored; a recognised key with a value that does not parse, or keys that
disagree (`dt=2024-01-02/day=03`), make the file read whatever the window (never prune on a
guess). Pruned files' records are not part of the request at all: they are not counted as
out-of-window, and ids in them are not seen by the duplicate check. A file holding records
outside its partition's interval, or partitions labelled in another time zone, need `prune: false`.

Each file read is also pruned by its zones (`prune_zones`: `sources/zones.py`) with the same window
and `prune` flag: only the parts of it that may hold records of the window are read.

Locators: a record's locator is `file number << 40 | its locator in the file` (byte offset or row
position), so a file may be up to 2**40 bytes (or rows) and a directory may hold 2**23 read files.
"""

from __future__ import annotations

import calendar
import datetime as dt
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

import numpy as np

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.recorded_text import is_utf8, utf8_shown
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.lake.storage import filesystem
from pcbo_dagster.sources.local_files import REASONS, SourcesDirectory, place_in_sources
from pcbo_dagster.sources.record_files import csv_integer_columns, source_read_errors
from pcbo_dagster.sources.streaming import (
    CsvSource,
    JsonlSource,
    ParquetSource,
    RecordSource,
    python_batch_bytes,
)
from pcbo_dagster.sources.zones import Window, ZoneIndexStore

LOCATOR_BITS = 40
MAX_FILES = 1 << (63 - LOCATOR_BITS)
_LOCAL_MASK = (1 << LOCATOR_BITS) - 1

#: Extensions (lower case) of each format.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "jsonl": (".jsonl", ".ndjson"),
    "csv": (".csv",),
    "parquet": (".parquet",),
}

_US_PER_DAY = 86_400_000_000
_US_PER_HOUR = 3_600_000_000
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()

# re.ASCII: `\d` is 0-9 only (without it any script's digits match, and int() reads them: a path is
# never pruned on a reading of `dt=２０２４-01-02` as 2024)
_DAY = r"(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})"
_DATE_FORMS = (
    re.compile(_DAY, re.ASCII),
    re.compile(r"(?P<year>\d{4})(?P<month>\d{2})(?P<day>\d{2})", re.ASCII),
    re.compile(_DAY + r"[T ](?P<hour>\d{2})", re.ASCII),
)
_INSTANT_FORM = re.compile(
    _DAY + r"[T ](?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d{1,6}))?)?"
    r"(?P<offset>Z|[+-]\d{2}:\d{2})?",
    re.ASCII,
)
_INTEGER_FORMS = {
    "year": re.compile(r"\d{4}", re.ASCII),
    "month": re.compile(r"\d{1,2}", re.ASCII),
    "day": re.compile(r"\d{1,2}", re.ASCII),
    "hour": re.compile(r"\d{1,2}", re.ASCII),
}
_CHAIN = ("year", "month", "day", "hour")


def format_of(name: str) -> str | None:
    """The data format of a file name by its extension (any case), or None."""
    lowered = name.lower()
    for fmt, suffixes in EXTENSIONS.items():
        if lowered.endswith(suffixes):
            return fmt
    return None


def _day_us(year: int, month: int, day: int) -> int:
    return (dt.date(year, month, day).toordinal() - _EPOCH_ORDINAL) * _US_PER_DAY


def _instant_us(match: re.Match[str]) -> int | None:
    """Microseconds since the epoch of a `_INSTANT_FORM` match (naive: UTC), or None if invalid."""
    try:
        moment = dt.datetime(
            int(match["year"]),
            int(match["month"]),
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"] or 0),
            int((match["fraction"] or "0").ljust(6, "0")),
        )
    except ValueError:
        return None
    offset = match["offset"]
    seconds = 0
    if offset and offset != "Z":
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            return None
        seconds = (1 if offset[0] == "+" else -1) * (hours * 3600 + minutes * 60)
    delta = moment - dt.datetime(1970, 1, 1)
    return (delta.days * 86_400 + delta.seconds - seconds) * 1_000_000 + delta.microseconds


def _date_fields(value: str) -> dict[str, int] | int | None:
    """A `dt`/`date` value: calendar fields (a day or an hour), a lower bound in microseconds (an
    instant with minutes), or None (not a form this module reads)."""
    for form in _DATE_FORMS:
        match = form.fullmatch(value)
        if match:
            return {k: int(v) for k, v in match.groupdict().items()}
    match = _INSTANT_FORM.fullmatch(value)
    if match:
        return _instant_us(match)
    return None


def time_interval(directories: list[str]) -> tuple[int, int | None] | None:
    """The interval [lo, hi) (microseconds since the epoch, UTC; hi None: unbounded) that a file
    below these hive path components (`name=value`, URL-encoded) can hold, or None when nothing can
    be said (no recognised key, an unreadable value, keys that disagree). See the module docstring."""
    fields: dict[str, int] = {}
    lower_bound: int | None = None
    for component in directories:
        name, sep, raw = component.partition("=")
        if not sep:
            continue
        key, value = unquote(name).strip().lower(), unquote(raw)
        found: dict[str, int]
        if key in ("dt", "date"):
            parsed = _date_fields(value)
            if parsed is None:
                return None
            if isinstance(parsed, int):
                if lower_bound is not None and lower_bound != parsed:
                    return None
                lower_bound = parsed
                continue
            found = parsed
        elif key in _INTEGER_FORMS:
            if not _INTEGER_FORMS[key].fullmatch(value):
                return None
            found = {key: int(value)}
        else:
            continue
        for field, number in found.items():
            if fields.setdefault(field, number) != number:
                return None
    chain = []
    for field in _CHAIN:
        if field not in fields:
            break
        chain.append(fields[field])
    if not chain and lower_bound is None:
        return None
    if not chain:
        assert lower_bound is not None
        return lower_bound, None
    chain_lo, chain_hi = _chain_interval(chain)
    if chain_lo is None or chain_hi is None:
        return None
    lo = chain_lo if lower_bound is None else max(lower_bound, chain_lo)
    if lo >= chain_hi:  # an instant after its date's interval: inconsistent
        return None
    return lo, chain_hi


def _chain_interval(chain: list[int]) -> tuple[int | None, int | None]:
    """[lo, hi) of (year[, month[, day[, hour]]]); (None, None) if the values are out of range."""
    year = chain[0]
    if not 1 <= year <= 9999:
        return None, None
    if len(chain) == 1:
        start = _day_us(year, 1, 1)
        return start, start + (366 if calendar.isleap(year) else 365) * _US_PER_DAY
    month = chain[1]
    if not 1 <= month <= 12:
        return None, None
    days_in_month = calendar.monthrange(year, month)[1]
    if len(chain) == 2:
        start = _day_us(year, month, 1)
        return start, start + days_in_month * _US_PER_DAY
    day = chain[2]
    if not 1 <= day <= days_in_month:
        return None, None
    start = _day_us(year, month, day)
    if len(chain) == 3:
        return start, start + _US_PER_DAY
    hour = chain[3]
    if not 0 <= hour <= 23:
        return None, None
    start += hour * _US_PER_HOUR
    return start, start + _US_PER_HOUR


def may_hold(interval: tuple[int, int | None] | None, window_us: tuple[int, int]) -> bool:
    """Whether a file of `interval` (None: unknown) may hold records of [start, end)."""
    if interval is None:
        return True
    lo, hi = interval
    start, end = window_us
    return lo < end and (hi is None or hi > start)


@contextmanager
def _naming(path: str) -> Iterator[None]:
    """Errors reading one file of the directory name that file."""
    try:
        yield
    except InvalidInput as exc:
        if path in exc.message:
            raise
        raise InvalidInput(exc.field, f"{path}: {exc.message}") from None


class _CsvFile(CsvSource):
    """One CSV file of a directory: header and integer columns decided by the directory, over all its
    files (`DirectorySource._prepare_csv`, from each file's `integer_cells`)."""

    def _prepare(self) -> None:
        """Already done by the directory."""


_FILE_CLASSES: dict[str, type[RecordSource]] = {
    "jsonl": JsonlSource,
    "csv": _CsvFile,
    "parquet": ParquetSource,
}


#: How many paths of files not read a document lists (`DirectorySource.file_report`).
REPORTED_PATHS = 20


class DirectorySource(RecordSource):
    """The data files of a directory read in order as one source (see the module docstring).

    `files`: the relative paths read (a record's file number is its index here); `pruned`: those
    skipped because their partition lies outside the window; `ignored`: other files below the
    directory that are not read (other extensions; not counting `_`/`.` paths)."""

    def __init__(
        self,
        uri: str,
        shown: str,
        fmt: str,
        files: list[tuple[str, str]],
        pruned: list[str] | None = None,
        ignored: list[str] | None = None,
    ) -> None:
        """`files`: (relative path, URI) of each file to read, in order."""
        super().__init__(uri, shown)
        if len(files) > MAX_FILES:
            raise InvalidInput(
                "source.uri",
                f"{redact_url(shown)} holds {len(files)} files to read; the limit is {MAX_FILES}",
            )
        self.kind = fmt
        self.files = [path for path, _ in files]
        self.pruned = list(pruned or [])
        self.ignored = list(ignored or [])
        base = shown.rstrip("/")
        self._sources = [_FILE_CLASSES[fmt](file_uri, f"{base}/{path}") for path, file_uri in files]
        self._prepared = fmt != "csv"
        self._lock = threading.Lock()

    def confine(self, root: SourcesDirectory) -> None:
        super().confine(root)
        for source in self._sources:
            source.confine(root)

    def prune_zones(self, window: Window | None, store: ZoneIndexStore | None = None) -> None:
        """Each file read only where it may hold records of `window` (`sources/zones.py`), besides the
        files pruned by their hive path."""
        super().prune_zones(window, store)
        for source in self._sources:
            source.prune_zones(window, store)

    def file_report(self) -> dict[str, Any]:
        """What a dry-run or execute document says of the directory's files (`sourceFiles`): how many
        were read, how many pruned by their hive path, and the files below it that are not of the
        format read (how many, and the first `REPORTED_PATHS` of their relative paths), so a file
        of another extension (`.json`, `.txt`, `.jsonl.gz`) or format is never left out unseen.
        Paths starting with `_` or `.` (`_SUCCESS`, `.crc`) are not counted."""
        return {
            "format": self.kind,
            "read": len(self.files),
            "pruned": len(self.pruned),
            "notRead": len(self.ignored),
            "notReadPaths": self.ignored[:REPORTED_PATHS],
        }

    def zone_report(self) -> dict[str, int]:
        reports = [source.zone_report() for source in self._sources]
        return {"zones": sum(r["zones"] for r in reports), "read": sum(r["read"] for r in reports)}

    def _prepare_csv(self) -> None:
        """One pass over every CSV file: the common header and the integer columns of the run."""
        header: list[str] | None = None
        first = ""
        cells: dict[int, bool] = {}
        for path, source in zip(self.files, self._sources, strict=True):
            assert isinstance(source, _CsvFile)
            with _naming(path):
                found = source.integer_cells()
            if source.header == []:
                continue  # an empty file: no header, no rows
            if header is None:
                header, first = source.header, path
            elif source.header != header:
                raise InvalidInput(
                    "source", f"{path}: CSV header {source.header} differs from that of {first} ({header})"
                )
            for i, flag in found.items():
                cells[i] = cells.get(i, True) and flag
        integer_columns = csv_integer_columns(header or [], cells)
        for source in self._sources:
            assert isinstance(source, _CsvFile)
            source.integer_columns = integer_columns
        self._prepared = True

    def _ensure_prepared(self) -> None:
        if not self._prepared:
            with self._lock:
                if not self._prepared:
                    self._prepare_csv()

    def batches(self, size: int) -> Iterator[tuple[list[Any], bool, np.ndarray]]:
        """The files' batches in order, joined into batches of about `size` records and at most
        `python_batch_bytes()` of values (a batch never holds more than `size` records plus those of
        the batch of one file, nor more bytes than the budget but for one file's batch alone)."""
        self._ensure_prepared()
        records: list[Any] = []
        locators: list[np.ndarray] = []
        risky = False
        count = held = 0
        budget = python_batch_bytes()

        def handed_on() -> tuple[list[Any], bool, np.ndarray]:
            nonlocal records, locators, risky, count, held
            batch = (records, risky, np.concatenate(locators))
            count += len(records)
            self.held_bytes = held
            records, locators, risky, held = [], [], False, 0
            return batch

        for number, (path, source) in enumerate(zip(self.files, self._sources, strict=True)):
            with _naming(path):
                for part, part_risky, local in source.batches(size):
                    if len(local) and (int(local.max()) > _LOCAL_MASK or int(local.min()) < 0):
                        raise InvalidInput(
                            "source.uri",
                            f"a file of a directory source may hold up to 2**{LOCATOR_BITS} bytes or rows",
                        )
                    if records and held + source.held_bytes > budget:  # (handed on before it)
                        yield handed_on()
                    records.extend(part)
                    locators.append(local | np.int64(number << LOCATOR_BITS))
                    risky = risky or part_risky
                    held += source.held_bytes
                    if len(records) >= size or held >= budget:
                        yield handed_on()
        if records:
            yield handed_on()
        self.count = count

    def where(self, locator: int) -> str:
        number = locator >> LOCATOR_BITS
        if not 0 <= number < len(self._sources):
            return redact_url(self.shown)
        return self._sources[number].where(locator & _LOCAL_MASK)

    def fetch(self, locators: np.ndarray) -> list[Any]:
        """The records at `locators`, in that order: one read of each file they fall in."""
        self._ensure_prepared()
        locators = np.asarray(locators, dtype=np.int64)
        numbers = locators >> LOCATOR_BITS
        local = locators & _LOCAL_MASK
        if len(locators) and (int(numbers.min()) < 0 or int(numbers.max()) >= len(self._sources)):
            raise ValueError("locator names no file of this directory source")
        out: list[Any] = [None] * len(locators)
        order = np.argsort(numbers, kind="stable")
        sorted_numbers = numbers[order]
        cuts = np.flatnonzero(np.diff(sorted_numbers)) + 1
        for positions in np.split(order, cuts):
            if not len(positions):
                continue
            number = int(numbers[positions[0]])
            with _naming(self.files[number]):
                found = self._sources[number].fetch(local[positions])
            for k, record in zip(positions.tolist(), found, strict=True):
                out[k] = record
        return out


def _relative(root: str, path: str) -> str:
    """`path` relative to `root`; an object key's empty components kept (`dir//a.jsonl` is `/a.jsonl`)."""
    if not path.startswith(root):
        return path
    rest = path[len(root) :]
    return rest[1:] if rest.startswith("/") else rest


def _file_paths(fs: Any, root: str, shown: str, confine_to: SourcesDirectory | None) -> list[str]:
    """Every path below `root` that is not a folder. On a local file system a folder that is a
    symbolic link is walked as the folder it leads to (`fs.find` lists it as one file, so its data
    would be silently left out); a link back to a folder on the way there is invalid input naming
    it, and so, with `confine_to` (a server's sources directory), is one leading outside it, before
    it is listed. Folders whose name starts with `_` or `.` are not walked (their files are skipped
    anyway)."""
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(fs, LocalFileSystem):
        return list(fs.find(root, withdirs=False))
    found: list[str] = []

    def walk(path: str, on_the_way: frozenset[str]) -> None:
        real = os.path.realpath(path)
        if real in on_the_way:
            raise InvalidInput(
                "source.uri",
                f"{redact_url(shown)}: {_relative(root, path)} is a symbolic link loop (it leads back "
                "to a folder it is in)",
            )
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    if entry.name.startswith(("_", ".")):
                        continue
                    if confine_to is not None and entry.is_symlink():
                        place = place_in_sources(os.path.realpath(entry.path), confine_to)
                        if place is not None:
                            raise InvalidInput(
                                "source.uri", f"{_relative(root, entry.path)} {REASONS[place]}"
                            )
                    walk(entry.path, on_the_way | {real})
                else:
                    found.append(entry.path)

    walk(root, frozenset())
    return found


def is_directory(uri: str, shown: str) -> bool:
    """Whether `uri` names a directory now (the file system's listing cache dropped first: a
    long-lived process, Dagster's, must see what is there now, not what was)."""
    with source_read_errors(shown):
        fs, path = filesystem(uri)
        fs.invalidate_cache(path)
        return bool(fs.isdir(path))


def open_directory_source(
    uri: str,
    shown: str,
    fmt: str | None,
    window_us: tuple[int, int] | None,
    prune: bool = True,
    confine_to: SourcesDirectory | None = None,
) -> RecordSource:
    """The source of the directory at `uri` (`shown`: as the user gave it, for messages): its data
    files of format `fmt` (None: inferred, all files must agree), those whose hive partition lies
    outside `window_us` ([start, end) microseconds since the epoch, UTC) skipped when `prune`.
    `confine_to`: a server's sources directory, which no folder link it walks may lead out of."""
    if fmt is not None and fmt not in EXTENSIONS:
        raise InvalidInput(
            "source.format", f"{fmt} sources are not supported for a directory; use jsonl, csv or parquet"
        )
    if not is_directory(uri, shown):
        raise InvalidInput("source.uri", f"not a directory: {redact_url(shown)}")
    with source_read_errors(shown):
        fs, root = filesystem(uri)
        root = root.rstrip("/")
        found = sorted(_relative(root, p) for p in _file_paths(fs, root, shown, confine_to))
    by_format: dict[str, list[str]] = {}
    ignored: list[str] = []
    for path in found:
        parts = path.split("/")
        if not path or any(part.startswith(("_", ".")) for part in parts):
            continue
        if path.endswith("/"):  # an object store's folder marker (`dt=2024-01-01/`): a folder, no file
            continue
        if "" in parts:  # (`dir//a.jsonl`: s3fs reads it as `dir/a.jsonl`, another object or none)
            raise InvalidInput(
                "source.uri",
                f"{redact_url(shown)} holds an object key with an empty path component (//): {path}",
            )
        if not is_utf8(path):
            raise InvalidInput(
                "source.uri",
                f"{redact_url(shown)} holds a file whose name is not UTF-8: {utf8_shown(path)}",
            )
        file_format = format_of(parts[-1])
        if file_format is None or (fmt is not None and file_format != fmt):
            ignored.append(path)
        else:
            by_format.setdefault(file_format, []).append(path)
    if not by_format:
        wanted = fmt or "jsonl/csv/parquet"
        raise InvalidInput("source.uri", f"{redact_url(shown)} holds no {wanted} files")
    if len(by_format) > 1:
        examples = ", ".join(f"{paths[0]} ({name})" for name, paths in sorted(by_format.items()))
        raise InvalidInput(
            "source.format",
            f"{redact_url(shown)} holds files of several formats ({examples}); give source.format",
        )
    chosen, paths = next(iter(by_format.items()))
    read: list[tuple[str, str]] = []
    pruned: list[str] = []
    for path in paths:
        if prune and window_us is not None and not may_hold(time_interval(path.split("/")[:-1]), window_us):
            pruned.append(path)
        else:
            read.append((path, fs.unstrip_protocol(f"{root}/{path}")))
    return DirectorySource(uri, shown, chosen, read, pruned, ignored)
