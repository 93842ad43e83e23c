"""The backfill request (CONTRACT section 1): strict JSON parsing and a pydantic model.

Parsing is strict on purpose: a typo must not silently disable a policy. Unknown fields, duplicate
object keys, NaN/Infinity, floats in metadata, lone surrogates and timestamps without an offset are
all refused with an `InvalidInput` naming the field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import parse_instant
from pcbo_dagster.core.record_table import ID, OCCURRED_AT, RETENTION_EXPIRES_AT
from pcbo_dagster.core.recorded_text import has_control_character
from pcbo_dagster.core.sql_target_spec import SqlTargetSpec, TargetFieldError
from pcbo_dagster.io.redaction import has_userinfo, userinfo_refused

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
#: A ledger's hash as Horizon and the lake show it; a ledger sequence is a uint32.
LEDGER_HASH_PATTERN = r"^[0-9a-f]{64}$"
MAX_LEDGER_SEQUENCE = 2**32 - 1
MAX_PARTITIONS = 100_000
_DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"


def _instant(value: str) -> str:
    if parse_instant(value) is None:
        raise ValueError(
            "must be an ISO-8601 instant with seconds and an explicit offset, e.g. 2024-01-01T00:00:00Z"
        )
    return value


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


def _metadata_value(value: Any, key: str) -> None:
    """Check the metadata value under `key`: strings, safe integers, booleans, null, objects and
    arrays only; the error names the offending value's path. Iterative, so a value nested as deep as
    a request may be is never a `RecursionError`."""
    # (value, its path as a linked list (name, parent)): the path's text is made only for an error
    stack: list[tuple[Any, Any]] = [(value, (key, None))]
    while stack:
        item, where = stack.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            _utf8(item)
        elif isinstance(item, int):
            if abs(item) > 2**53 - 1:
                raise ValueError(f"{_path_text(where)}: integers must be within +-(2**53 - 1)")
        elif isinstance(item, list):
            stack.extend((v, (i, where)) for i, v in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            stack.extend((v, (_utf8(k), where)) for k, v in reversed(list(item.items())))
        else:
            raise ValueError(
                f"{_path_text(where)}: only strings, integers, booleans, null, objects and arrays "
                f"are allowed (no floats), got {type(item).__name__}"
            )


def _path_text(where: Any) -> str:
    """`a.b[0].c` from the linked path `(name or index, parent)` of `_metadata_value`."""
    parts: list[str] = []
    while where is not None:
        name, where = where
        parts.append(f"[{name}]" if isinstance(name, int) else f".{name}" if where is not None else name)
    return "".join(reversed(parts))


def _no_control_characters(value: str) -> str:
    """A path or URL holds no control character (U+0000-U+001F, U+007F): a NUL names no file at all,
    and a pasted newline another file than the one meant (as `--input` and the other path flags)."""
    if has_control_character(value):
        raise ValueError("holds a control character: a path or URL holds none")
    return value


def _no_userinfo(value: str) -> str:
    if has_userinfo(value):
        raise ValueError(userinfo_refused(value))
    return value


Name = Annotated[StrictStr, Field(pattern=NAME_PATTERN)]
#: Where records or a lake are stored (a path, `file://`, `s3://`, `gs://`): never with credentials.
StoreUri = Annotated[
    StrictStr, Field(min_length=1), AfterValidator(_no_control_characters), AfterValidator(_no_userinfo)
]
Instant = Annotated[StrictStr, AfterValidator(_instant)]
Text = Annotated[StrictStr, AfterValidator(_utf8)]


class Policies(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requireConsent: StrictBool = True
    allowedJurisdictions: list[Text] | None = None
    retentionCutoff: Instant | None = None
    onViolation: Literal["omit", "block"] = "omit"


class TrustedLedger(BaseModel):
    """A ledger hash the operator took from the network (a validator or Horizon they trust): the
    ledger `sequence`'s `hash`, 64 lowercase hex digits as Horizon shows it. An archive's ledgers are
    then loaded only when ledger `sequence` has that hash and every ledger of the range before it links
    to it (`sources/ledger_archives.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sequence: Annotated[StrictInt, Field(ge=1, le=MAX_LEDGER_SEQUENCE)]
    hash: Annotated[StrictStr, Field(pattern=LEDGER_HASH_PATTERN)]


class SourceRef(BaseModel):
    """Records stored elsewhere: a file or a directory of files (local, `file://`, `s3://`, `gs://`)
    and its format.

    For a directory (`sources.hive_directories`) `format` may be left out (inferred from the files'
    extensions, which must agree). `prune` (default false) opts in to reading only what may hold
    records of the request's window: a directory's files whose hive partition path (`dt=`, `date=`,
    `year=/month=/day=/hour=`) lies outside its time window, and the zones of a file
    (`sources/zones.py`) whose records all lie outside it, are skipped unread and are then not part of
    the request. Without it every record of the source is part of the request, as inline records are
    (CONTRACT sections 1-2: each is decided or unplaced, `OUT_OF_WINDOW` included, and in the plan
    hash)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: StoreUri
    format: Literal["jsonl", "parquet", "csv", "ledger_archive"] | None = None
    #: Skip files and zones that provably hold no record of the window (default false: opt-in, as
    #: their records are then not part of the request).
    prune: StrictBool = False
    #: A ledger archive may miss ledgers of the range (default false: a gap is invalid input naming
    #: the missing ledgers). When true, the gaps are recorded in the manifests of the partitions
    #: they fall into (`gaps`: [[first, last], ...]).
    allowGaps: StrictBool = False
    #: A ledger archive's range anchored to the network: its last ledger's hash as the operator
    #: trusts it (the range's every ledger links to it, or nothing is written).
    trustedLedger: TrustedLedger | None = None

    def resolved_format(self) -> str:
        """The format of a single-file source: `format`, else inferred from the URI's extension.
        Not for a directory (whose format is `format` or inferred from its files); nothing calls
        this while validating a request, so a directory without `format` is valid input."""
        if self.format:
            return self.format
        lowered = self.uri.lower()
        for suffix, fmt in (
            (".jsonl", "jsonl"),
            (".ndjson", "jsonl"),
            (".parquet", "parquet"),
            (".csv", "csv"),
        ):
            if lowered.endswith(suffix):
                return fmt
        raise InvalidInput("source.format", "cannot be inferred from the URI; give jsonl, parquet or csv")


#: `ns.table`: an Iceberg namespace and table name (letters, digits and `_`, each starting with a letter
#: or `_`), usable as they are in SQL.
TABLE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}\.[A-Za-z_][A-Za-z0-9_]{0,127}$"
_TABLE_CATALOG_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "http", "https")


def is_table_catalog_url(value: str) -> bool:
    """Whether `value` is a URL an Iceberg catalog can be opened at (`tables.open_catalog`): SQL
    (sqlite://, postgresql://) or REST (http(s)://)."""
    scheme, sep, _ = value.partition("://")
    return bool(sep) and scheme.lower() in _TABLE_CATALOG_SCHEMES


def _table_catalog(value: str) -> str:
    """`pcbo` (the pcbo catalog's own database) or a catalog URL without a secret in it."""
    if value == "pcbo":
        return value
    scheme, sep, rest = value.partition("://")
    if not is_table_catalog_url(value):
        raise ValueError(
            "must be pcbo (the pcbo catalog's database) or a sqlite://, postgresql:// or http(s):// "
            "(REST) catalog URL; leave it out for the default (PCBO_ICEBERG_CATALOG_URL, else "
            "$PCBO_HOME/iceberg.db)"
        )
    authority = rest.split("/", 1)[0]
    if "@" in authority or "?" in rest or "#" in rest:
        raise ValueError(
            "no credentials or query in a request or config (no secret belongs in a file): put the "
            "URL in PCBO_ICEBERG_CATALOG_URL and leave catalog out"
        )
    return value


class TableSpec(BaseModel):
    """Where committed partitions are published as a table (issue 17): an Apache Iceberg table
    `name` in `catalog` (left out: `PCBO_ICEBERG_CATALOG_URL`, else a SQLite catalog under
    `PCBO_HOME`). Not part of the plan hash: the table is a view of what the lake commits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["iceberg"] = "iceberg"
    catalog: Annotated[StrictStr, AfterValidator(_table_catalog)] | None = None
    name: Annotated[StrictStr, Field(pattern=TABLE_NAME_PATTERN)]


class LedgerRange(BaseModel):
    """Partitioning by ledger sequence instead of time (an extension; see the README): partition i
    holds the records whose `field` is in [first + i*partitionSize, min(first + (i+1)*partitionSize,
    end)); its key is `range=<first ledger>-<last ledger>` like a bronze layer's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: Annotated[StrictStr, Field(pattern=NAME_PATTERN)] = "ledgerSequence"
    first: Annotated[StrictInt, Field(ge=0, le=2**53 - 1)]
    end: Annotated[StrictInt, Field(ge=1, le=2**53 - 1)]
    partitionSize: Annotated[StrictInt, Field(ge=1, le=2**32)]


class BackfillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    runId: Name
    dataset: Name
    versionLabel: Name = "v1"
    start: Instant | None = None
    end: Instant | None = None
    ledgerRange: LedgerRange | None = None
    chunkSeconds: Annotated[StrictInt, Field(ge=1, le=10**12)] = 3600
    policies: Policies = Policies()
    sourceRecords: list[Any] | None = None
    source: SourceRef | None = None
    existingTargetIds: list[Text] = []
    expectedDecisionHash: Annotated[StrictStr, Field(pattern=_DIGEST_PATTERN)] | None = None
    metadata: dict[Text, Any] = {}
    #: Publish committed partitions to this table (not part of the plan hash).
    table: TableSpec | None = None
    #: A SQL table to write instead of the lake (issue 15; `core/sql_target_spec.py`).
    target: SqlTargetSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> BackfillRequest:
        if self.source is not None and self.source.format == "ledger_archive" and self.ledgerRange is None:
            raise _FieldError("source.format", "a ledger_archive source needs a ledgerRange request")
        if self.source is not None and self.source.allowGaps and self.source.format != "ledger_archive":
            raise _FieldError("source.allowGaps", "only a ledger_archive source can have gaps")
        if self.source is not None and self.source.trustedLedger is not None:
            trusted = self.source.trustedLedger
            if self.source.format != "ledger_archive" or self.ledgerRange is None:
                raise _FieldError(
                    "source.trustedLedger", "only a ledger_archive source's ledgers can be anchored"
                )
            if trusted.sequence != self.ledgerRange.end - 1:
                raise _FieldError(
                    "source.trustedLedger.sequence",
                    f"must be the range's last ledger, {self.ledgerRange.end - 1} (ledgerRange.end is "
                    "exclusive): a trusted hash anchors the ledgers up to its own",
                )
        if self.target is not None and self.table is not None:
            raise _FieldError(
                "table", "publishes the lake's partitions: a request with a SQL target has none"
            )
        if (self.sourceRecords is None) == (self.source is None):
            raise _FieldError("sourceRecords", "give exactly one of sourceRecords (inline) and source")
        for key, value in self.metadata.items():
            try:
                _metadata_value(value, key)
            except ValueError as exc:
                raise _FieldError("metadata", str(exc)) from None
        if self.ledgerRange is not None:
            for name in ("start", "end", "chunkSeconds"):
                if name in self.model_fields_set:
                    raise _FieldError(name, "does not apply to a ledgerRange request")
            if self.ledgerRange.field in (ID, OCCURRED_AT, RETENTION_EXPIRES_AT):
                raise _FieldError(
                    "ledgerRange.field",
                    f"{self.ledgerRange.field} is a string (or null) in every valid record: "
                    "no record could be placed by it",
                )
            if self.ledgerRange.end <= self.ledgerRange.first:
                raise _FieldError("ledgerRange.end", "must be greater than ledgerRange.first")
            span, chunk, field = (
                self.ledgerRange.end - self.ledgerRange.first,
                self.ledgerRange.partitionSize,
                "ledgerRange.partitionSize",
            )
        else:
            for name in ("start", "end"):
                if getattr(self, name) is None:
                    raise _FieldError(name, "is required (or give a ledgerRange)")
            if self.end_us <= self.start_us:
                raise _FieldError("end", "must be later than start")
            span, chunk, field = self.end_us - self.start_us, self.chunkSeconds * 1_000_000, "chunkSeconds"
        count = -(-span // chunk)
        if count > MAX_PARTITIONS:
            raise _FieldError(
                field, f"the window would make {count} partitions; the limit is {MAX_PARTITIONS}"
            )
        return self

    @property
    def start_us(self) -> int:
        return parse_instant(self.start)  # type: ignore[return-value]

    @property
    def end_us(self) -> int:
        return parse_instant(self.end)  # type: ignore[return-value]

    @property
    def chunk_us(self) -> int:
        return self.chunkSeconds * 1_000_000


class _FieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(message)


class ParsedJson:
    """The JSON document plus what the strict parser noticed (floats or long integers present)."""

    def __init__(self, value: Any, may_hold_floats_or_big_ints: bool) -> None:
        self.value = value
        self.may_hold_floats_or_big_ints = may_hold_floats_or_big_ints


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r} in an object")
            seen.add(key)
    return result


#: Arrays and objects nest at most this many levels in any JSON pcbo reads (a request, a source line,
#: a proof, an evidence package); every step after the parser (validation, digests, catalog rows,
#: outputs) handles that depth. One level more is invalid input, whatever the caller's stack depth.
MAX_JSON_DEPTH = 900
_NOT_A_BRACKET_OR_QUOTE = bytes(b for b in range(256) if b not in b'[]{}"')
_BRACKET_STEP = bytes.maketrans(b'[{]}"', b"\x01\x01\xff\xff\x00")  # as int8: +1, -1, 0


#: A text this long is scanned without first counting its brackets (issue 18: the count, two passes
#: over the text, only ever spares the scan of a small text).
_COUNT_BRACKETS_BELOW = 1 << 16


def nested_deeper_than(raw: bytes, limit: int) -> bool:
    """True when arrays and objects nest more than `limit` levels in the JSON text `raw`: counted over
    its brackets outside strings, never by recursion. A short text with no more than `limit` opening
    brackets is not even scanned."""
    if len(raw) < _COUNT_BRACKETS_BELOW and raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    import numpy as np

    # Escaped backslashes, then escaped quotes (pairs taken from the left, as JSON reads them): the
    # quotes left open and close strings.
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    kept = raw.translate(None, _NOT_A_BRACKET_OR_QUOTE)
    # Strings holding no bracket are adjacent quote pairs here. When taking such pairs out (from the
    # left) leaves no quote, every run of quotes had an even length, so every bracket has an even
    # number of quotes before it: all of them lie outside strings, as the parity count below finds,
    # and they are counted alone (issue 18: a tenth of the bytes for a request of inline records).
    brackets = kept.replace(b'""', b"")
    if b'"' not in brackets:
        steps = np.frombuffer(brackets.translate(_BRACKET_STEP), dtype=np.int8)
        return bool(np.cumsum(steps, dtype=np.int32).max(initial=0) > limit)
    quotes = np.frombuffer(kept, dtype=np.uint8) == ord('"')
    outside = (np.cumsum(quotes, dtype=np.uint8) & 1) == 0  # an even number of quotes so far
    steps = np.frombuffer(kept.translate(_BRACKET_STEP), dtype=np.int8)  # +1, -1, 0 for a quote
    return bool(np.cumsum(steps * outside, dtype=np.int32).max(initial=0) > limit)


#: The longest integer text read as a number (longer ones are refused before Python converts them).
MAX_INTEGER_DIGITS = 1000


def parse_json_strict(raw: bytes | str, what: str = "request") -> ParsedJson:
    """Parse JSON refusing NaN/Infinity, duplicate keys and nesting deeper than `MAX_JSON_DEPTH`; note
    whether floats or long ints occur."""
    floats_seen = False

    def _float(text: str) -> float:
        nonlocal floats_seen
        floats_seen = True
        return float(text)

    def _int(text: str) -> int:
        nonlocal floats_seen
        if len(text) > 15:  # may lie beyond +-(2**53 - 1): let rfc8785 judge
            floats_seen = True
            if len(text) > MAX_INTEGER_DIGITS:  # (Python's own limit, 4300, says to raise it)
                raise ValueError(
                    f"an integer of {len(text.lstrip('-'))} digits (JSON numbers hold integers within "
                    "±(2^53−1) only)"
                )
        return int(text)

    too_deep = f"nested too deeply (arrays and objects nest at most {MAX_JSON_DEPTH} levels)"
    if nested_deeper_than(
        raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw, MAX_JSON_DEPTH
    ):
        raise InvalidInput(what, too_deep)
    if not isinstance(raw, str):
        # UTF-8 only (RFC 8259), one leading byte-order mark allowed: `json.loads` of bytes would take
        # UTF-16 or UTF-32 as well, guessed line by line from the first bytes (a JSONL source whose
        # lines are in three encodings), and surrogates encoded in UTF-8, which no UTF-8 reader takes.
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
        try:
            raw = raw[bom:].decode("utf-8")
        except UnicodeDecodeError as exc:  # its text would show the byte: a source may be anything
            raise InvalidInput(what, f"not valid JSON: not UTF-8 at byte {bom + exc.start}") from None
    try:
        value = json.loads(
            raw,
            parse_float=_float,
            parse_int=_int,
            parse_constant=_reject_constant,
            object_pairs_hook=_pairs_without_duplicates,
        )
    except ValueError as exc:
        raise InvalidInput(what, f"not valid JSON: {exc}") from None
    except RecursionError:  # a caller deep in its own stack: refused as the bound refuses it
        raise InvalidInput(what, too_deep) from None
    return ParsedJson(value, floats_seen)


def _loc_to_field(loc: tuple[Any, ...]) -> str:
    field = ""
    for part in loc:
        if isinstance(part, int):
            field += f"[{part}]"
        elif str(part).startswith(("function-", "constrained-")):
            continue
        else:
            field += ("." if field else "") + str(part)
    return field or "request"


def validate_request(document: Any) -> BackfillRequest:
    """Validate a parsed JSON document into a `BackfillRequest`, or raise `InvalidInput`."""
    if not isinstance(document, dict):
        raise InvalidInput("request", "must be a JSON object")
    try:
        return BackfillRequest.model_validate(document)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        ctx_error = (error.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _FieldError):
            raise InvalidInput(ctx_error.field, ctx_error.message) from None
        field = _loc_to_field(tuple(error["loc"]))
        if isinstance(ctx_error, TargetFieldError):  # relative to the target block
            raise InvalidInput(f"{field}.{ctx_error.field}", ctx_error.message) from None
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field (a typo must not silently disable a policy)"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        raise InvalidInput(field, message) from None
