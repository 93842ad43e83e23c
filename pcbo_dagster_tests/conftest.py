"""Shared fixtures and the published test vectors (`vectors/`, see its README)."""

from __future__ import annotations

from pathlib import Path

#: The RFC 6962 and RFC 8785 vectors, kept in the repository (`vectors/README.md` names the sources).
VECTORS_DIR = Path(__file__).resolve().parent / "vectors"

pytest_plugins = [
    "pcbo_dagster_tests.postgres_server",
    "pcbo_dagster_tests.object_store_servers",
    "pcbo_dagster_tests.redis_server",
    "pcbo_dagster_tests.frozen_hosts",
]
