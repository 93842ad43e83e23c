"""Datasets as configuration: the YAML file that declares what the Dagster code location serves.

```yaml
datasets:
  - name: events                      # [A-Za-z0-9][A-Za-z0-9._-]{0,127}, like a request's dataset
    versionLabel: v1                  # default v1; the audit chain key is <name>/<versionLabel>
    partitioning:                     # time windows ...
      kind: time_window
      cron: hourly                    # hourly | daily | any 5-field cron ("0 */6 * * *")
      start: "2024-01-01T00:00:00Z"   # ISO instant with an explicit offset
      end: "2024-01-04T00:00:00Z"     # optional, exclusive
      timezone: UTC                   # UTC only
    source: {uri: demo_data/events.jsonl, format: jsonl}   # relative: see below; a directory
                                      # too (give format), with prune: false to read every file
    lake: null                        # optional lake URL for this dataset
    policies: {requireConsent: true, allowedJurisdictions: [US, CA],
               retentionCutoff: "2024-06-01T00:00:00Z", onViolation: omit}
    existingTargetIds: []
    backfillPolicy: {kind: multi_run, maxPartitionsPerRun: 500}   # or {kind: single_run}
    pool: null                        # Dagster pool; default pcbo-<name>
    checkGranularity: partition       # partition: one check evaluation per partition key;
                                      # run: one per check and run (fewer events for big backfills)
    table: {format: iceberg, name: analytics.events}   # optional: publish to an Iceberg table
                                      # (catalog: left out = PCBO_ICEBERG_CATALOG_URL, else
                                      # $PCBO_HOME/iceberg.db; pcbo = the pcbo catalog's database)
    target: null                      # optional: a SQL table instead of the lake (issue 15):
                                      # {kind: sql, url, table, key: [...], conflict, columns, ...}
                                      # (core/sql_target_spec.py; a relative sqlite:/// path resolves
                                      # against the file's directory; its pool: one per table)
    rollout:                          # optional: staged rollout (staging and production assets)
      stagingLake: null               # default: the staging environment's lake
      throttle: {partitionsPerMinute: 20, recordsPerMinute: null}
      soak: {windowMinutes: 360}      # the soak monitor watches staging this long
      businessMetric: {name: conversion_rate, expression: "mean(converted)", atLeast: 0.85}
      approvers: ["ops.example/alice+1a2b3c4d+AU...", ...]   # verifier keys (pcbo keys generate)
      requiredApprovals: 1            # how many listed approvers must sign an approval
  - name: ledgers
    partitioning: {kind: ledger_range, firstLedger: 2, partitionSize: 64, lastLedger: 641}
                                      # field: ledgerSequence (the integer record field, default);
                                      # without lastLedger the range is open-ended: a sensor adds
                                      # a range=START-END key for each full partition in the source
    ...
```

The file is read strictly, like a request: unknown fields, duplicate keys and timestamps without an
offset are refused with `InvalidInput` naming the field (`datasets[1].partitioning.cron`). YAML 1.1
surprises are switched off: only `true`/`false` are booleans (so `NO` stays Norway) and timestamps
stay strings (quoting them is still advised). `pcbo validate-config FILE` validates a
file (exit 2 and the field on stderr when it is bad).

Which file: the one named (`validate-config FILE`, the rollout commands' `--config FILE`), else
`PCBO_DATASETS_CONFIG`, else the example shipped in the package
(`pcbo_dagster/datasets/examples/datasets.yaml`, so an installed wheel has it). Relative `lake` paths
resolve against the file's directory; relative `source.uri` paths against `PCBO_SOURCES_DIR` when it
is set, else against the file's directory, except for the packaged example: its sources
(`demo_data/*.jsonl`) resolve against `PCBO_HOME` (default `./.pcbo`), where `pcbo demo-data` writes
them (`sources_dir_for`).
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import parse_instant
from pcbo_dagster.core.partition_keys import (
    LedgerGrid,
    PartitionKeyError,
    Window,
    format_time_key,
    window_for_key,
)
from pcbo_dagster.core.request_model import (
    MAX_PARTITIONS,
    Instant,
    Name,
    Policies,
    StoreUri,
    TableSpec,
    Text,
)
from pcbo_dagster.core.sql_target_spec import SqlTargetSpec, TargetFieldError
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.sources.record_files import resolve_uri

#: Cron shortcuts accepted in `partitioning.cron`.
CRON_SHORTCUTS = {"hourly": "0 * * * *", "daily": "0 0 * * *"}
#: Fixed-length crons: their windows are all this many seconds long (one engine request per range).
REGULAR_CRON_SECONDS = {"0 * * * *": 3600, "0 0 * * *": 86400}

_CRON_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_CRON_NAMES: tuple[dict[str, int], ...] = (
    {},
    {},
    {},
    {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
    {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())},
)
_CRON_FIELD_NAMES = ("minute", "hour", "day of month", "month", "day of week")


def _cron_value(text: str, index: int) -> int:
    names = _CRON_NAMES[index]
    if text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        raise ValueError(f"{_CRON_FIELD_NAMES[index]} field: {text!r} is not a number")
    value = int(text)
    lo, hi = _CRON_BOUNDS[index]
    if not lo <= value <= hi:
        raise ValueError(f"{_CRON_FIELD_NAMES[index]} field: {value} is outside {lo}-{hi}")
    return value


def normalize_cron(cron: str) -> str:
    """A cron shortcut resolved, then the 5-field expression checked; `ValueError` says what is wrong."""
    expression = CRON_SHORTCUTS.get(cron.strip().lower(), cron.strip())
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"must be hourly, daily or a 5-field cron expression (minute hour day month weekday), "
            f"got {len(fields)} field(s)"
        )
    for index, text in enumerate(fields):
        for item in text.split(","):
            base, _, step = item.partition("/")
            if step and (not step.isdigit() or int(step) < 1):
                raise ValueError(
                    f"{_CRON_FIELD_NAMES[index]} field: step {step!r} must be a positive integer"
                )
            if base == "*":
                continue
            lo_text, dash, hi_text = base.partition("-")
            lo = _cron_value(lo_text, index)
            if dash and _cron_value(hi_text, index) < lo:
                raise ValueError(f"{_CRON_FIELD_NAMES[index]} field: range {base!r} runs backwards")
    try:  # Dagster's own check, when Dagster is installed (it also refuses e.g. February 30th)
        from dagster._utils.schedules import is_valid_cron_string
    except ImportError:  # pragma: no cover - the dagster extra is not installed
        return expression
    if not is_valid_cron_string(expression):
        raise ValueError(f"{expression!r} is not a cron expression Dagster accepts")
    return expression


def _cron_sets(expression: str) -> list[set[int]]:
    """The values each field of a (checked) 5-field cron expression matches."""
    sets = []
    for index, text in enumerate(expression.split()):
        lo_bound, hi_bound = _CRON_BOUNDS[index]
        values: set[int] = set()
        for item in text.split(","):
            base, _, step_text = item.partition("/")
            step = int(step_text) if step_text else 1
            if base == "*":
                lo, hi = lo_bound, hi_bound
            else:
                lo_text, dash, hi_text = base.partition("-")
                lo = _cron_value(lo_text, index)
                hi = _cron_value(hi_text, index) if dash else (hi_bound if step_text else lo)
            values.update(range(lo, hi + 1, step))
        if index == 4 and 7 in values:  # Sunday is 0 and 7
            values.add(0)
        sets.append(values)
    return sets


def cron_tick_count(expression: str, start_us: int, end_us: int, limit: int) -> int:
    """How many ticks of `expression` (UTC) fall in [start, end): counted a day at a time, and no
    further than `limit` + 1 (enough to say "more than the limit"). At most one pass over the days of
    the range, so a cron that ticks rarely over centuries costs a few seconds, never memory."""
    minutes, hours, days, months, weekdays = _cron_sets(expression)
    per_day = sorted(h * 60 + m for h in hours for m in minutes)
    day_restricted, weekday_restricted = len(days) < 31, len(weekdays) < 7
    start_minute = -(-start_us // 60_000_000)  # ticks are on whole minutes
    end_minute = -(-end_us // 60_000_000)
    first_day = dt.date(1970, 1, 1) + dt.timedelta(days=start_minute // 1440)
    count, day, day_minute = 0, first_day, (start_minute // 1440) * 1440
    while day_minute < end_minute and count <= limit:
        weekday = (day.weekday() + 1) % 7  # cron: 0 = Sunday
        if day.month in months and (
            (day.day in days or weekday in weekdays)
            if day_restricted and weekday_restricted
            else (day.day in days and weekday in weekdays)
        ):
            low, high = max(start_minute - day_minute, 0), min(end_minute - day_minute, 1440)
            count += bisect.bisect_left(per_day, high) - bisect.bisect_left(per_day, low)
        day += dt.timedelta(days=1)
        day_minute += 1440
    return count


def asset_name_for(dataset: str) -> str:
    """Dagster asset names allow [A-Za-z0-9_]: other characters of a dataset name become `_`."""
    return re.sub(r"[^A-Za-z0-9_]", "_", dataset)


class _Strict(BaseModel):
    # No field takes NaN or an infinity: a NaN baseline no value meets, a NaN rate, an infinite soak.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TimeWindowPartitioning(_Strict):
    kind: Literal["time_window"]
    cron: Annotated[StrictStr, Field(min_length=1)] = "hourly"
    start: Instant
    end: Instant | None = None
    timezone: Literal["UTC"] = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return normalize_cron(value)

    @model_validator(mode="after")
    def _window(self) -> TimeWindowPartitioning:
        end_us = self.end_us
        if end_us is not None and end_us <= self.start_us:
            raise _FieldError("end", "must be later than start")
        seconds = self.fixed_window_seconds
        if seconds is not None and end_us is not None:
            count = (end_us - self.start_us) // (seconds * 1_000_000)
            if count > MAX_PARTITIONS:
                raise _FieldError(
                    "end", f"the window would make {count} partitions; the limit is {MAX_PARTITIONS}"
                )
        elif end_us is not None and cron_tick_count(self.cron, self.start_us, end_us, MAX_PARTITIONS + 1) > (
            MAX_PARTITIONS + 1
        ):
            raise _FieldError(
                "cron", f"ticks more than {MAX_PARTITIONS} times between start and end (the partition limit)"
            )
        return self

    @property
    def start_us(self) -> int:
        return parse_instant(self.start)  # type: ignore[return-value]

    @property
    def end_us(self) -> int | None:
        return None if self.end is None else parse_instant(self.end)

    @property
    def fixed_window_seconds(self) -> int | None:
        """Window length when every window of this cron has the same length (hourly, daily)."""
        return REGULAR_CRON_SECONDS.get(self.cron)

    def _first_window_start_us(self, step: int) -> int:
        """Dagster's first window of a fixed-length cron starts on the first tick at or after `start`."""
        return -(-self.start_us // step) * step

    def keys(self) -> list[str]:
        """The partition keys (`format_time_key` of each window start) of a closed hourly or daily range."""
        seconds = self.fixed_window_seconds
        if seconds is None or self.end_us is None:
            raise ValueError("only a closed hourly or daily range has a fixed key list here")
        step = seconds * 1_000_000
        first = self._first_window_start_us(step)
        return [format_time_key(start) for start in range(first, self.end_us - step + 1, step)]

    def window_of_key(self, key: str) -> Window:
        """The hourly or daily window whose key is `key`; `PartitionKeyError` naming the key when it
        is not a time key or not one of this dataset's windows (off the cron's ticks, before `start`,
        past `end`)."""
        seconds = self.fixed_window_seconds
        if seconds is None:
            raise ValueError("only hourly or daily windows have a fixed length")
        window = window_for_key(key, seconds)
        step = window.length_us
        end_us = self.end_us
        if (
            window.start_us % step
            or window.start_us < self._first_window_start_us(step)
            or (end_us is not None and window.end_us > end_us)
        ):
            raise PartitionKeyError(
                f"partition key {key!r} is not a window of this dataset ({self.cron} from {self.start}"
                f"{'' if self.end is None else f' to {self.end}'})"
            )
        return window


class LedgerRangePartitioning(_Strict):
    kind: Literal["ledger_range"]
    #: The integer record field holding the ledger sequence (the request's `ledgerRange.field`).
    field: Name = "ledgerSequence"
    firstLedger: Annotated[StrictInt, Field(ge=1, le=2**32 - 1)]
    partitionSize: Annotated[StrictInt, Field(ge=1, le=2**32 - 1)]
    lastLedger: Annotated[StrictInt, Field(ge=1, le=2**32 - 1)] | None = None

    @model_validator(mode="after")
    def _range(self) -> LedgerRangePartitioning:
        if self.lastLedger is not None:
            if self.lastLedger < self.firstLedger:
                raise _FieldError("lastLedger", "must not be smaller than firstLedger")
            count = self.grid.partition_count()
            if count > MAX_PARTITIONS:
                raise _FieldError(
                    "partitionSize", f"the range would make {count} partitions; the limit is {MAX_PARTITIONS}"
                )
        return self

    @property
    def grid(self) -> LedgerGrid:
        """The dataset's ledger grid: its partitions, their keys and the keys' checks."""
        return LedgerGrid(self.firstLedger, self.partitionSize, self.lastLedger)

    def keys(self) -> list[str]:
        """`range=START-END` keys (END inclusive), the last one cut at `lastLedger`; `ValueError`
        for an open-ended range."""
        return self.grid.keys()


Partitioning = Annotated[TimeWindowPartitioning | LedgerRangePartitioning, Field(discriminator="kind")]


class SourceConfig(_Strict):
    uri: StoreUri
    format: Literal["jsonl", "parquet"] | None = None
    #: Skip files (hive partition paths) and zones (`sources/zones.py`) of the source that provably
    #: hold no record of a run's window (default true: a range run reads only its range); written
    #: into every request made from the config (a request's own default is false).
    prune: StrictBool = True

    @model_validator(mode="after")
    def _format(self) -> SourceConfig:
        if self.format is None and not self.uri.lower().endswith((".jsonl", ".ndjson", ".parquet")):
            raise _FieldError("format", "cannot be inferred from the URI; give jsonl or parquet")
        return self

    def resolved_format(self) -> str:
        if self.format is not None:
            return self.format
        return "parquet" if self.uri.lower().endswith(".parquet") else "jsonl"


class BackfillPolicyConfig(_Strict):
    kind: Literal["single_run", "multi_run"] = "single_run"
    maxPartitionsPerRun: Annotated[StrictInt, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _max(self) -> BackfillPolicyConfig:
        if self.kind == "multi_run" and self.maxPartitionsPerRun is None:
            raise _FieldError("maxPartitionsPerRun", "is required when kind is multi_run")
        if self.kind == "single_run" and self.maxPartitionsPerRun is not None:
            raise _FieldError("maxPartitionsPerRun", "only applies when kind is multi_run")
        return self


class ThrottleConfig(_Strict):
    """How fast a rollout's staging apply may go; unset limits do not apply."""

    partitionsPerMinute: Annotated[float, Field(gt=0, le=1_000_000)] | None = None
    recordsPerMinute: Annotated[float, Field(gt=0, le=1_000_000_000)] | None = None


def checked_throttle(values: dict[str, Any]) -> dict[str, Any]:
    """A rollout's throttle (the config's, with a run's overrides) validated as the config's
    `rollout.throttle` is; `InvalidInput` naming `throttle.<limit>`."""
    try:
        return ThrottleConfig.model_validate(values).model_dump()
    except ValidationError as exc:
        error = _invalid_input(exc)
        raise InvalidInput(f"throttle.{error.field}", error.message) from None


class SoakConfig(_Strict):
    #: How long a rollout's staging output is watched before it may be promoted (default 6 hours).
    windowMinutes: Annotated[float, Field(gt=0, le=60 * 24 * 90)] = 360


class BusinessMetricConfig(_Strict):
    """A number computed from the rollout's staging rows, held against a baseline every soak tick.

    `expression` is a small arithmetic language over the output's columns (`core/business_metric.py`):
    `mean(converted)`, `count(status == "paid") / count()`, `sum(amount) / count()`.
    """

    name: Name
    expression: Annotated[StrictStr, Field(min_length=1, max_length=2000)]
    atLeast: float | None = None
    atMost: float | None = None

    @model_validator(mode="after")
    def _bound(self) -> BusinessMetricConfig:
        if self.atLeast is None and self.atMost is None:
            raise _FieldError("atLeast", "give a baseline: atLeast and/or atMost")
        try:  # parsed now so a typo is refused when the config loads, not at the first soak tick
            from pcbo_dagster.core.business_metric import parse_metric

            parse_metric(self.expression)
        except ImportError:  # pragma: no cover - during the module's own bootstrap
            pass
        except ValueError as exc:
            raise _FieldError("expression", str(exc)) from None
        return self


class RolloutConfig(_Strict):
    """A dataset with `rollout` gets staging and production assets instead of one (staged rollout)."""

    stagingLake: StoreUri | None = None
    throttle: ThrottleConfig = ThrottleConfig()
    soak: SoakConfig = SoakConfig()
    businessMetric: BusinessMetricConfig | None = None
    #: The approvers' verifier keys (C2SP vkeys): only approvals signed by one of them count.
    approvers: list[StrictStr] = []
    #: How many distinct listed approvers must approve the staged decision hash.
    requiredApprovals: Annotated[int, Field(ge=1, le=100)] = 1

    @model_validator(mode="after")
    def _approvers(self) -> RolloutConfig:
        from pcbo_dagster.core.signed_approvals import approver_key_problem
        from pcbo_dagster.core.signed_note import NoteError, VerifierKey, parse_verifier_key

        keys: list[VerifierKey] = []
        for index, text in enumerate(self.approvers):
            try:
                key = parse_verifier_key(text)
            except NoteError as exc:
                raise _FieldError(f"approvers[{index}]", str(exc)) from None
            problem = approver_key_problem(key, keys)
            if problem is not None:
                raise _FieldError(f"approvers[{index}]", problem)
            keys.append(key)
        if self.approvers and self.requiredApprovals > len(self.approvers):
            raise _FieldError("requiredApprovals", f"more than the {len(self.approvers)} approvers listed")
        return self


class DatasetConfig(_Strict):
    name: Name
    description: Text | None = None
    versionLabel: Name = "v1"
    partitioning: Partitioning
    source: SourceConfig
    lake: StoreUri | None = None
    policies: Policies = Policies()
    existingTargetIds: list[Text] = []
    backfillPolicy: BackfillPolicyConfig = BackfillPolicyConfig()
    pool: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = None
    checkGranularity: Literal["partition", "run"] = "partition"
    auditChainKey: StrictStr | None = None
    rollout: RolloutConfig | None = None
    #: Publish committed partitions as an Iceberg table: {format: iceberg, catalog: ..., name: ns.table}
    #: (a rollout dataset: staging to the table's `staging` branch, promotion to `main`).
    table: TableSpec | None = None
    #: A SQL table written instead of the lake (issue 15).
    target: SqlTargetSpec | None = None

    @model_validator(mode="after")
    def _target(self) -> DatasetConfig:
        if self.target is not None and self.lake is not None:
            raise _FieldError("lake", "does not apply to a dataset with a SQL target")
        if self.target is not None and self.rollout is not None:
            raise _FieldError("rollout", "staged rollouts write lakes; a SQL target has no rollout")
        if self.target is not None and self.table is not None:
            raise _FieldError(
                "table", "publishes the lake's partitions: a dataset with a SQL target has none"
            )
        return self

    @model_validator(mode="after")
    def _rollout(self) -> DatasetConfig:
        partitioning = self.partitioning
        if self.rollout is None:
            return self
        if isinstance(partitioning, TimeWindowPartitioning):
            if partitioning.fixed_window_seconds is None or partitioning.end is None:
                raise _FieldError(
                    "rollout", "staged rollouts need hourly or daily windows with an end (a fixed key list)"
                )
        elif partitioning.lastLedger is None:
            raise _FieldError("rollout", "staged rollouts need a closed ledger range (lastLedger)")
        return self

    @model_validator(mode="after")
    def _chain(self) -> DatasetConfig:
        if self.auditChainKey is not None and self.auditChainKey != self.chain_key:
            raise _FieldError(
                "auditChainKey",
                f"must be {self.chain_key!r}: the engine keys each audit chain by <name>/<versionLabel>",
            )
        return self

    @property
    def chain_key(self) -> str:
        return f"{self.name}/{self.versionLabel}"

    @property
    def asset_name(self) -> str:
        return asset_name_for(self.name)

    @property
    def pool_name(self) -> str:
        """The Dagster pool: as configured; else one per SQL target table (every dataset writing it
        queues in it), or `pcbo-<name>`."""
        if self.pool:
            return self.pool
        if self.target is not None:
            where = hashlib.sha256(redact_url(self.target.url).encode("utf-8")).hexdigest()[:8]
            return f"pcbo-sql-{self.target.table}-{where}"
        return f"pcbo-{self.name}"


class DatasetsConfig(_Strict):
    version: Literal[1] = 1
    datasets: Annotated[list[DatasetConfig], Field(min_length=1)]
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _sources_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _unique(self) -> DatasetsConfig:
        seen: dict[str, int] = {}
        assets: dict[str, int] = {}
        for index, dataset in enumerate(self.datasets):
            if dataset.name in seen:
                raise _FieldError(
                    f"datasets[{index}].name",
                    f"{dataset.name!r} is already declared by datasets[{seen[dataset.name]}]",
                )
            if dataset.asset_name in assets:
                raise _FieldError(
                    f"datasets[{index}].name",
                    f"{dataset.name!r} gives the same Dagster asset name ({dataset.asset_name}) as "
                    f"datasets[{assets[dataset.asset_name]}]",
                )
            seen[dataset.name] = assets[dataset.asset_name] = index
        return self

    @property
    def base_dir(self) -> Path:
        """The config file's directory: relative `lake` and `stagingLake` paths resolve against it."""
        return self._base_dir

    @property
    def sources_dir(self) -> Path:
        """The directory relative source paths resolve against (`sources_dir_for`); the config
        file's directory unless the loader said otherwise."""
        return self._sources_dir or self._base_dir

    def source_uri(self, dataset: DatasetConfig) -> str:
        """The dataset's source URI, a relative path resolved against `sources_dir`."""
        return resolve_uri(dataset.source.uri, self.sources_dir)

    def lake_url(self, dataset: DatasetConfig) -> str | None:
        """The dataset's own lake, a relative path resolved like a source; None: the engine's lake."""
        return None if dataset.lake is None else resolve_uri(dataset.lake, self._base_dir)

    def staging_lake_url(self, dataset: DatasetConfig) -> str | None:
        """A rollout dataset's own staging lake; None: the staging environment's lake."""
        lake = dataset.rollout.stagingLake if dataset.rollout else None
        return None if lake is None else resolve_uri(lake, self._base_dir)

    def dataset(self, name: str) -> DatasetConfig:
        for dataset in self.datasets:
            if dataset.name == name:
                return dataset
        raise KeyError(name)


class _FieldError(ValueError):
    """A validation failure that knows its field, relative to the model raising it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(message)


# --- strict YAML ------------------------------------------------------------------------------


#: Collections nest at most this many levels in a datasets config (a real one nests a handful).
MAX_YAML_DEPTH = 100


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader refusing duplicate keys and nesting deeper than `MAX_YAML_DEPTH` (PyYAML composes a
    level in two Python frames: far deeper would be a `RecursionError`), with YAML 1.2-like scalars
    (no yes/no/on/off, no dates)."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self._depth >= MAX_YAML_DEPTH and not self.check_event(yaml.ScalarEvent, yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_YAML_11_ONLY = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
_StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in result:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=deep)
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _loc_to_field(loc: tuple[Any, ...]) -> str:
    field = ""
    for position, part in enumerate(loc):
        if isinstance(part, int):
            field += f"[{part}]"
            continue
        text = str(part)
        if text.startswith(("function-", "constrained-")):
            continue
        # Discriminated unions add the tag ("time_window") to the location: not a field.
        if position > 0 and loc[position - 1] == "partitioning" and text in ("time_window", "ledger_range"):
            continue
        field += ("." if field else "") + text
    return field or "config"


def _invalid_input(exc: ValidationError) -> InvalidInput:
    error = exc.errors(include_url=False)[0]
    field = _loc_to_field(tuple(error["loc"]))
    ctx_error = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _FieldError | TargetFieldError):
        field = f"{field}.{ctx_error.field}" if field != "config" else ctx_error.field
        return InvalidInput(field, ctx_error.message)
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field (a typo must not silently disable a policy)"
    elif error["type"] == "union_tag_invalid":
        message = "kind must be time_window or ledger_range"
        field = f"{field}.kind"
    elif error["type"] == "union_tag_not_found":
        message = "kind is required: time_window or ledger_range"
        field = f"{field}.kind"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error["type"] in ("string_type", "int_type") and isinstance(error.get("input"), bool):
        message += " (YAML reads an unquoted true/false as a boolean: quote it)"
    return InvalidInput(field, message)


def parse_datasets_config(
    text: str | bytes, base_dir: Path | None = None, sources_dir: Path | None = None
) -> DatasetsConfig:
    """Validate the YAML text of a datasets config; `InvalidInput` naming the field when it is bad.
    Relative lakes resolve against `base_dir` (default the working directory), relative sources
    against `sources_dir` (default `base_dir`)."""
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidInput("config", f"not valid YAML{where}: {problem}") from None
    if not isinstance(document, dict):
        raise InvalidInput("config", "must be a YAML mapping with a datasets list")
    try:
        config = DatasetsConfig.model_validate(document)
    except ValidationError as exc:
        raise _invalid_input(exc) from None
    config._base_dir = (base_dir or Path.cwd()).resolve()
    config._sources_dir = None if sources_dir is None else sources_dir.resolve()
    for index, dataset in enumerate(config.datasets):  # a relative SQLite target: against the file
        if dataset.target is not None:
            resolved = dataset.model_copy(update={"target": dataset.target.resolved(config._base_dir)})
            config.datasets[index] = resolved
    return config


#: The variable naming the datasets config the CLI and the Dagster code location load.
CONFIG_ENV = "PCBO_DATASETS_CONFIG"
#: The variable naming the directory relative source paths of a datasets config resolve against.
SOURCES_DIR_ENV = "PCBO_SOURCES_DIR"
#: The example datasets config shipped in the package (so it works from an installed wheel too):
#: used when neither a file nor `PCBO_DATASETS_CONFIG` is given.
DEFAULT_DATASETS_CONFIG = Path(__file__).resolve().parent / "examples" / "datasets.yaml"


def datasets_config_path(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """`path`, else `PCBO_DATASETS_CONFIG`, else the packaged example datasets config."""
    environ = os.environ if environ is None else environ
    return Path(path or environ.get(CONFIG_ENV) or DEFAULT_DATASETS_CONFIG)


def sources_dir_for(config_file: Path, environ: Mapping[str, str] | None = None) -> Path:
    """The directory relative source paths of `config_file` resolve against: `PCBO_SOURCES_DIR` when
    set; else, for the packaged example config, `PCBO_HOME` (default `./.pcbo`, so its
    `demo_data/*.jsonl` sources are looked for in a writable place, never inside the installed
    package); else the config file's own directory."""
    from pcbo_dagster.engine.settings import home_dir

    environ = os.environ if environ is None else environ
    explicit = environ.get(SOURCES_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    if config_file.resolve() == DEFAULT_DATASETS_CONFIG:
        return home_dir(env=environ)
    return config_file.resolve().parent


def load_datasets_config_from_env(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> DatasetsConfig:
    """The datasets config at `datasets_config_path(path, environ)`; `InvalidInput` naming the field
    and the file when it is bad."""
    where = datasets_config_path(path, environ)
    try:
        return load_datasets_config(where, environ)
    except InvalidInput as exc:
        raise InvalidInput(exc.field, f"{exc.message} (datasets config {where})") from None


def load_datasets_config(path: str | Path, environ: Mapping[str, str] | None = None) -> DatasetsConfig:
    """Read and validate a datasets config file: relative lakes resolve against its directory,
    relative sources against `sources_dir_for(path, environ)`."""
    from pcbo_dagster.io.regular_files import NotRegularFile, open_regular

    path = Path(path)
    try:
        # A regular file only, as for sources: a FIFO would block the load for ever, /dev/zero never end.
        with open_regular(str(path)) as fh:
            text = fh.read()
    except FileNotFoundError:
        raise InvalidInput("config", f"no such file: {path}") from None
    except NotRegularFile:
        raise InvalidInput("config", f"{path} is not a regular file") from None
    except OSError as exc:
        raise InvalidInput("config", f"cannot be read: {exc.__class__.__name__}: {path}") from None
    return parse_datasets_config(text, path.resolve().parent, sources_dir_for(path, environ))
