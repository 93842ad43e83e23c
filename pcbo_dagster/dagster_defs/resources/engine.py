"""`PcboEngineResource`: where the engine reads and writes, as a Dagster ConfigurableResource.

Each field is optional. Unset, the engine resolves it exactly as the `pcbo` CLI does
(`engine.settings.Settings.resolve`): the environment variable, then the embedded default under
`PCBO_HOME` (`./.pcbo`): lake `$PCBO_HOME/lake`, catalog `sqlite:///$PCBO_HOME/catalog.db`, audit
backup `$PCBO_HOME/pas`, no remote audit endpoint. `from_env()` binds every variable that is set to
its field as a Dagster `EnvVar`, so the UI shows which variable configures what.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.settings import Settings, redact_url

#: Resource field -> the environment variable the engine reads for it.
ENV_VARS = {
    "home": "PCBO_HOME",
    "lake": "PCBO_LAKE_URL",
    "catalog": "PCBO_CATALOG_URL",
    "audit_dir": "PCBO_AUDIT_DIR",
    "audit_endpoint": "PCBO_AUDIT_ENDPOINT",
}


class PcboEngineResource(dg.ConfigurableResource):
    """The lake, the catalog and the audit emitter the engine writes to (one `Environment`)."""

    home: str | None = Field(default=None, description="PCBO_HOME; default ./.pcbo")
    lake: str | None = Field(default=None, description="Lake URL (path, file://, s3://, gs://)")
    catalog: str | None = Field(default=None, description="Catalog URL (sqlite:/// or postgresql://)")
    audit_dir: str | None = Field(default=None, description="Local audit backup directory")
    audit_endpoint: str | None = Field(default=None, description="HTTP endpoint audit events are sent to")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> PcboEngineResource:
        """Each field bound to its `EnvVar` when that variable is set, else left to the engine."""
        environ = dict(os.environ if environ is None else environ)
        bound = {field: dg.EnvVar(var) for field, var in ENV_VARS.items() if environ.get(var)}
        return cls(**bound)

    def settings(self, lake: str | None = None) -> Settings:
        """The engine settings; `lake` (a dataset's own lake) overrides the resource's."""
        return Settings.resolve(
            home=self.home,
            lake=lake or self.lake,
            catalog=self.catalog,
            audit_dir=self.audit_dir,
            audit_endpoint=self.audit_endpoint,
        )

    @contextmanager
    def environment(self, lake: str | None = None) -> Iterator[Environment]:
        """An open engine `Environment` (catalog migrated), closed on exit."""
        env = Environment.open(self.settings(lake))
        try:
            yield env
        finally:
            env.close()

    def describe(self, lake: str | None = None) -> dict[str, str | None]:
        """Where things go, with any password removed (for logs and metadata)."""
        s = self.settings(lake)
        return {
            "home": str(s.home),
            "lake": redact_url(s.lake_url),
            "catalog": redact_url(s.catalog_url),
            "audit_dir": str(s.audit_dir),
            "audit_endpoint": redact_url(s.audit_endpoint) if s.audit_endpoint else None,
        }
