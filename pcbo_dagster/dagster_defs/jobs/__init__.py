"""Jobs of the pcbo code location besides the asset jobs: `pcbo_request` (one request through the engine)."""

from pcbo_dagster.dagster_defs.jobs.request_job import JOB_NAME, build_request_job, pcbo_request_job

__all__ = ["JOB_NAME", "build_request_job", "pcbo_request_job"]
