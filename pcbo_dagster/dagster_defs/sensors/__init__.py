"""Sensors of the pcbo code location: one per open-ended ledger dataset, adding its partition keys."""

from pcbo_dagster.dagster_defs.sensors.ledger_partitions_sensor import (
    build_ledger_partitions_sensor,
    max_ledger_in_source,
)

__all__ = ["build_ledger_partitions_sensor", "max_ledger_in_source"]
