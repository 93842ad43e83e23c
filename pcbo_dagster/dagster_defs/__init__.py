"""The Dagster layer: one partitioned asset per configured dataset, its checks and resources.

Laid out by concern (dagster-open-platform style): `resources/` (the engine's adapters as
ConfigurableResources), `partitions.py` (datasets' partitioning as Dagster partitions), `assets/`
(the backfill assets and, beside them, their checks) and one `definitions.py` that builds the
`Definitions` from the datasets config file. Every write goes through the engine
(`pcbo_dagster.engine`): this layer plans nothing and writes nothing itself.
"""
