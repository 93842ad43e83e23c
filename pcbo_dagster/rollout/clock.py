"""The rollout's notion of time: `now()` and `sleep()`, real by default, controlled in tests.

Soak windows, throttles and pauses are measured on this clock, so a test drives a six-hour soak or a
20-partitions-a-minute throttle in milliseconds with `ManualClock` (its `sleep` advances `now`).
No moment read from it goes into a data file or a digest.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from pcbo_dagster.io.clock import utc_now


class Clock:
    def now(self) -> datetime:
        return utc_now()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class ManualClock(Clock):
    """A clock that only moves when told to (`advance`) or when something sleeps on it."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._now = start
        self.slept: list[float] = []

    def now(self) -> datetime:
        return self._now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=max(0.0, seconds))


REAL_CLOCK = Clock()
