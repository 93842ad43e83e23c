"""The staging apply's rate limit: partitions per minute and/or records per minute.

Before each partition, `Throttle.delay(records)` says how long to wait so that, measured from the
start of the previous partition, neither limit is exceeded: at most `partitionsPerMinute` partition
starts a minute, and a partition of `n` records "costs" `n / recordsPerMinute` minutes before the next
one may start. The first partition starts at once. A partition larger than a minute's record budget
still goes through whole (the partition is the unit of atomicity) and simply delays the next one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: The limits a throttle sets (the datasets config's `rollout.throttle` keys).
LIMITS = ("partitionsPerMinute", "recordsPerMinute")


def strictest(*throttles: Mapping[str, Any]) -> dict[str, float | None]:
    """Each limit at the lowest rate any of `throttles` sets (None where none sets it). For checked
    throttles only (`datasets.config.checked_throttle`): rates above 0."""
    out: dict[str, float | None] = {}
    for limit in LIMITS:
        rates = [float(t[limit]) for t in throttles if t.get(limit) is not None]
        out[limit] = min(rates) if rates else None
    return out


@dataclass
class Throttle:
    partitions_per_minute: float | None = None
    records_per_minute: float | None = None
    _last_start: datetime | None = field(default=None, repr=False)
    _last_records: int = field(default=0, repr=False)

    @classmethod
    def from_config(cls, throttle: dict[str, Any]) -> Throttle:
        return cls(throttle.get("partitionsPerMinute"), throttle.get("recordsPerMinute"))

    def describe(self) -> str:
        parts = []
        if self.partitions_per_minute is not None:
            parts.append(f"{self.partitions_per_minute:g} partitions/min")
        if self.records_per_minute is not None:
            parts.append(f"{self.records_per_minute:g} records/min")
        return " and ".join(parts) or "unthrottled"

    def delay(self, now: datetime) -> float:
        """Seconds to wait at `now` before the next partition may start."""
        if self._last_start is None:
            return 0.0
        gap = 0.0
        if self.partitions_per_minute is not None:
            gap = max(gap, 60.0 / self.partitions_per_minute)
        if self.records_per_minute is not None:
            gap = max(gap, 60.0 * self._last_records / self.records_per_minute)
        elapsed = (now - self._last_start).total_seconds()
        return max(0.0, gap - elapsed)

    def started(self, now: datetime, records: int) -> None:
        """Record that a partition of `records` rows started at `now`."""
        self._last_start = now
        self._last_records = records
