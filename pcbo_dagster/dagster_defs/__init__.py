"""The Dagster layer: wiring only. Every write goes through the engine (`pcbo_dagster.engine`); this
layer plans nothing and writes nothing itself.

Grouped by domain, as dagster-io/dagster-open-platform is: `backfill/`, `rollout/` and `alerts/`,
each with its assets, checks, jobs, sensors and schedules side by side; `partitions.py` (datasets'
partitioning as Dagster partitions) and `resources.py` (the engine's adapters as
ConfigurableResources) serve them all; `definitions.py` merges them into the code location;
`remote.py` submits a request to a webserver (`pcbo execute --dagster`).
"""
