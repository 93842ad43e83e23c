"""The one engine: plan, dry-run, execute, verify, proof and rollback, used by the CLI and Dagster."""
