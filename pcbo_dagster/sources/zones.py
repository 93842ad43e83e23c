"""Zone maps: a range run reads only the parts of a large source that may hold records of its range.

A source file is cut into **zones** — consecutive records: about `ZONE_BYTES` (1 MiB) of lines of a
JSONL or CSV file, one row group of a parquet file — and each zone carries the lowest and highest
*placement value* of its records (the instant of `occurredAt` in microseconds for a time request, the
integer of the ledger field for a `ledgerRange` request) and whether **every** record of it has one
(`exact`). With `source.prune` (opt-in in a request; a dataset config's default) a request for
[start, end) skips a zone exactly when it provably holds no record of that window: it is exact and
its values lie wholly outside [start, end). A zone with a record whose value is missing or
unreadable (an unparseable timestamp, a line that is not a JSON object, a ledger field that is not a
JSON integer) is never skipped. So are the zones of a
source whose layout cannot be read (below).

Pruned zones are not part of the request, as for hive directories (`sources/hive_directories.py`):
their records are not in the plan hash, not counted `OUT_OF_WINDOW`, and their ids are not seen by
the duplicate check. Records outside the window in a zone that is read stay in the request (counted
`OUT_OF_WINDOW`), so which of them are part of it depends on the zone layout: that layout is fixed
(`ZONE_BYTES`, row groups), never configured, so a request means the same records on every host and
every run. `prune: false` reads every record.

Where zone bounds come from:
- parquet whose column is a `timestamp` with a time zone (time) or a signed integer (ledger): the
  row groups' footer statistics (min, max, and a null count of 0), nothing else read;
- any other parquet column: that one column, read once per row group;
- JSONL and CSV: the file, read once: a run without an index reads the whole file once as it always
  did, holding back each zone until it is complete, and yields only the zones that may hold the
  window (so the records of the request are the same with an index or without one).

An index of zones is kept per source in a `ZoneIndexStore` (the catalog's `source_zone_indexes`
table: `catalog/source_indexes.py`), keyed by the source's identity as its store reports it without
reading it — S3's ETag and size, GCS's generation and checksums, a local file's device, inode, size,
modification and change times — so a changed source is a new key (a source whose store gives no
identity is never indexed: it is read once a run, as without an index). Later runs of any range read
the index and seek to their zones (JSONL and CSV by byte offset, parquet by row group).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from pcbo_dagster.core.canonical import jcs, json_integer
from pcbo_dagster.core.instants import parse_instants
from pcbo_dagster.io.redaction import redact_url

#: Bytes of lines a JSONL or CSV zone holds (it ends at the first line end past them). Fixed: which
#: records outside the window are part of a pruned request depends on it.
ZONE_BYTES = 1 << 20
INDEX_VERSION = "pcbo.zones/1"


@dataclass(frozen=True)
class Window:
    """What a request places records by: `field`'s values in [start, end) (instants in
    microseconds, or ledger numbers when `ledger`)."""

    field: str
    ledger: bool
    start: int
    end: int


@dataclass(frozen=True)
class Zone:
    """Records at locators [start, end) (bytes of a text file, row positions of a parquet file)."""

    start: int
    end: int
    low: int | None
    high: int | None
    exact: bool
    #: The line number of the zone's first line (text files; 1-based), for messages.
    line: int = 1
    #: CSV: per column, whether every non-empty cell of the zone is a safe integer (None: no
    #: non-empty cell), so a run's integer columns are decided over the zones it reads.
    integers: tuple[bool | None, ...] = ()

    def may_hold(self, window: Window) -> bool:
        """False only when the zone provably holds no record of the window."""
        if not self.exact:
            return True
        if self.low is None or self.high is None:
            return False  # no record at all
        return self.low < window.end and self.high >= window.start

    def to_json(self) -> list[Any]:
        return [self.start, self.end, self.low, self.high, self.exact, self.line, list(self.integers)]

    @classmethod
    def from_json(cls, value: list[Any]) -> Zone:
        start, end, low, high, exact, line, integers = value
        return cls(int(start), int(end), low, high, bool(exact), int(line), tuple(integers))


def selected(zones: Sequence[Zone], window: Window) -> list[Zone]:
    """The zones that may hold records of the window, in order."""
    return [zone for zone in zones if zone.may_hold(window)]


def ranges(zones: Sequence[Zone]) -> list[tuple[int, int, int]]:
    """(start, end, first line) of runs of adjacent zones, merged."""
    merged: list[tuple[int, int, int]] = []
    for zone in zones:
        if merged and merged[-1][1] == zone.start:
            merged[-1] = (merged[-1][0], zone.end, merged[-1][2])
        else:
            merged.append((zone.start, zone.end, zone.line))
    return merged


class ZoneIndexStore(Protocol):
    """Where indexes of zones are kept between runs (the catalog)."""

    def zone_index(self, key: str) -> bytes | None: ...

    def save_zone_index(self, key: str, data: bytes) -> None: ...


@dataclass
class ZoneIndex:
    """A source's zones and what built them (the CSV header the integer flags go with)."""

    zones: list[Zone]
    header: list[str] | None = None

    def encode(self) -> bytes:
        # Plain sorted JSON, not JCS: bounds may be integers past JSON's safe range (a ledger field,
        # the open end of a CSV file's last zone), which Python's json reads back exactly.
        document = {"v": INDEX_VERSION, "header": self.header, "zones": [z.to_json() for z in self.zones]}
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> ZoneIndex | None:
        try:
            document = json.loads(data)
            if document.get("v") != INDEX_VERSION:
                return None
            return cls([Zone.from_json(z) for z in document["zones"]], document.get("header"))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None  # an unreadable index is no index: the source is read again


def source_identity(fs: Any, path: str) -> str | None:
    """What identifies a source's content without reading it (module docstring), or None."""
    try:
        if type(fs).__name__ == "LocalFileSystem":
            st = os.stat(path)
            return f"local:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        fs.invalidate_cache(path)
        info = fs.info(path)
    except (OSError, ValueError):
        return None
    if info.get("generation"):  # GCS: a new generation on every write
        parts = [info.get("generation"), info.get("md5Hash") or info.get("crc32c")]
    elif info.get("ETag"):  # S3: the content's ETag (and the version, on a versioned bucket)
        parts = [info.get("ETag"), info.get("VersionId")]
    else:
        return None
    return f"{type(fs).__name__}:{info.get('size')}:" + ":".join(str(p) for p in parts if p)


def index_key(uri: str, identity: str, fmt: str, window: Window) -> str:
    """The key of a source's zone index: its URI (without credentials), identity, format, field."""
    document = {
        "v": INDEX_VERSION,
        "uri": redact_url(uri),
        "identity": identity,
        "format": fmt,
        "field": window.field,
        "ledger": window.ledger,
        "zoneBytes": ZONE_BYTES,
    }
    return "sha256:" + hashlib.sha256(jcs(document)).hexdigest()


@dataclass
class ZoneStats:
    """The placement values of a zone's records as they are read (text files)."""

    ledger: bool
    values: list[Any] = field(default_factory=list)
    exact: bool = True
    count: int = 0

    def add_record(self, record: Any, name: str) -> None:
        self.count += 1
        value = record.get(name) if isinstance(record, dict) else None
        self.add_value(value)

    def add_value(self, value: Any) -> None:
        if not self.exact:
            return
        if self.ledger:
            integer = json_integer(value)  # as the decisions read a ledger field (`5.0` is `5`)
            if integer is not None:
                self.values.append(integer)
            else:
                self.exact = False
        elif isinstance(value, str):
            self.values.append(value)
        else:
            self.exact = False

    def bounds(self) -> tuple[int | None, int | None, bool]:
        """(low, high, exact) of the values added."""
        if not self.exact:
            return None, None, False
        if not self.values:
            return None, None, True
        if self.ledger:
            return min(self.values), max(self.values), True
        return bounds_of_instants(pa.array(self.values, pa.string()))


def bounds_of_instants(values: pa.Array) -> tuple[int | None, int | None, bool]:
    """(low, high, exact) of a string array parsed as instants; not exact when one does not parse."""
    parsed = parse_instants(values)
    if parsed.null_count:
        return None, None, False
    if len(parsed) == 0:
        return None, None, True
    low, high = pc.min_max(parsed).values()
    return low.as_py(), high.as_py(), True
