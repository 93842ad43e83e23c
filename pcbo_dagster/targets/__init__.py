"""Targets other than the parquet lake: SQL tables (issue 15)."""
