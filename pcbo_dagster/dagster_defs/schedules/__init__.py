"""Schedules of the pcbo code location: the soak monitor."""

from pcbo_dagster.dagster_defs.schedules.soak_monitor_schedule import build_soak_monitor

__all__ = ["build_soak_monitor"]
