"""Publication of the lake as tables other engines read (issue 17): `iceberg_publication` (committed
partitions to an Apache Iceberg table, bound to the evidence) and `query` (SQL over it with DuckDB)."""
