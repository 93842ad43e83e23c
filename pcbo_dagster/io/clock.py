"""The wall clock: the one place pcbo reads the current instant.

Not in `core`, whose functions depend on their arguments alone (that is how no wall-clock time can
reach a data file or a digest): reading the clock asks the environment, as the other modules of
`io` do. The audit log's default clock, `rollout.clock.Clock` and the catalog's recorded-at
columns read it here.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """The current instant, timezone-aware, in UTC."""
    return datetime.now(UTC)
