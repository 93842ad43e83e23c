"""Staged rollout, without Dagster: staging apply → soak → approval → production, with health checks,
rollback and alerts. `operations.py` is the entry point the `pcbo rollout` commands and the Dagster
jobs, schedule and sensors call; the README's "Staged rollout" section describes the behaviour."""
