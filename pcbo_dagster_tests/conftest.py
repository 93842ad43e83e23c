"""Shared fixtures. `../shared` (the contract's test vectors) sits beside the repository; tests that
need it skip cleanly when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("PCBO_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_vectors() -> Path:
    vectors = SHARED_DIR / "vectors"
    if not vectors.is_dir():
        pytest.skip(f"shared test vectors not found at {vectors}")
    return vectors
pytest_plugins = ["pcbo_dagster_tests.postgres_server", "pcbo_dagster_tests.object_store_servers"]
