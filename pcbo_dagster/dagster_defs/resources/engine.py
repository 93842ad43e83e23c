"""`PcboEngineResource`: the engine's adapters composed into one resource that opens an `Environment`.

It nests the four adapter resources (`adapters.py`: `CatalogResource`, `LakeResource`,
`AuditResource`, `SourcesResource`) plus `home` (`PCBO_HOME`, default `./.pcbo`), the root of the
engine's embedded defaults. An asset, a check, a sensor or the request job asks for `pcbo` and gets
one object that opens one engine `Environment` (lake + catalog + audit log), resolved exactly as
the `pcbo` CLI resolves its flags (`engine.settings.Settings.resolve`): an unset field falls back to
its environment variable, then to the embedded default.

`PcboEngineResource.from_env()` binds every `PCBO_*` variable that is set to its field as a Dagster
`EnvVar` (the UI shows the variable's name, not its value). Anything logged goes through
`describe()`, which removes passwords and query strings from URLs (`redact_url`).

    PcboEngineResource(home="/data/pcbo")                                   # embedded defaults there
    PcboEngineResource(catalog=CatalogResource(url=dg.EnvVar("PCBO_CATALOG_URL")),
                       lake=LakeResource(url="s3://bucket/lake"))
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import dagster as dg
from pydantic import Field

from pcbo_dagster.dagster_defs.resources.adapters import (
    ENV_VARS as ADAPTER_ENV_VARS,
)
from pcbo_dagster.dagster_defs.resources.adapters import (
    AuditResource,
    CatalogResource,
    LakeResource,
    SourcesResource,
)
from pcbo_dagster.datasets_config import DatasetConfig, DatasetsConfig
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.settings import Settings, redact_url
from pcbo_dagster.rollout.environments import staging_settings

#: Field path of `PcboEngineResource` -> the environment variable bound to it when set.
ENV_VARS: dict[str, str] = {
    "home": "PCBO_HOME",
    "lake.url": ADAPTER_ENV_VARS["LakeResource"]["url"],
    "catalog.url": ADAPTER_ENV_VARS["CatalogResource"]["url"],
    "audit.directory": ADAPTER_ENV_VARS["AuditResource"]["directory"],
    "audit.endpoint": ADAPTER_ENV_VARS["AuditResource"]["endpoint"],
    "sources.base_dir": ADAPTER_ENV_VARS["SourcesResource"]["base_dir"],
    "sources.config_path": ADAPTER_ENV_VARS["SourcesResource"]["config_path"],
}


class PcboEngineResource(dg.ConfigurableResource):
    """The lake, the catalog, the audit emitter and the sources the engine uses (one `Environment`)."""

    home: str | None = Field(
        default=None, description="PCBO_HOME, root of the embedded defaults; default ./.pcbo"
    )
    catalog: CatalogResource
    lake: LakeResource
    audit: AuditResource
    sources: SourcesResource

    def __init__(
        self,
        *,
        home: str | None = None,
        catalog: CatalogResource | None = None,
        lake: LakeResource | None = None,
        audit: AuditResource | None = None,
        sources: SourcesResource | None = None,
        **kwargs: Any,
    ) -> None:
        # Dagster resources cannot default a nested resource: an omitted adapter is an unset one.
        super().__init__(
            home=home,
            catalog=catalog if catalog is not None else CatalogResource(),
            lake=lake if lake is not None else LakeResource(),
            audit=audit if audit is not None else AuditResource(),
            sources=sources if sources is not None else SourcesResource(),
            **kwargs,
        )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> PcboEngineResource:
        """Each field bound to its `EnvVar` when that variable is set, else left to the engine."""
        environ = dict(os.environ if environ is None else environ)
        return cls(
            home=dg.EnvVar("PCBO_HOME") if environ.get("PCBO_HOME") else None,
            catalog=CatalogResource.from_env(environ),
            lake=LakeResource.from_env(environ),
            audit=AuditResource.from_env(environ),
            sources=SourcesResource.from_env(environ),
        )

    def settings(self, lake: str | None = None) -> Settings:
        """The engine settings; `lake` (a dataset's own lake) overrides the resource's."""
        return Settings.resolve(
            home=self.home,
            lake=lake or self.lake.url,
            catalog=self.catalog.url,
            audit_dir=self.audit.directory,
            audit_endpoint=self.audit.endpoint,
        )

    @contextmanager
    def environment(self, lake: str | None = None) -> Iterator[Environment]:
        """An open engine `Environment` (catalog migrated), closed on exit."""
        with self._open(self.settings(lake)) as env:
            yield env

    def environment_for(
        self, config: DatasetsConfig, dataset: DatasetConfig, stage: str | None = None
    ) -> AbstractContextManager[Environment]:
        """The open environment of a configured dataset: its production lake, or (`stage="staging"`)
        the staging environment of a rollout dataset (`rollout/environments.py`)."""
        if stage == "staging":
            return self._open(staging_settings(self.settings(), config.staging_lake_url(dataset)))
        return self.environment(config.lake_url(dataset))

    @contextmanager
    def _open(self, settings: Settings) -> Iterator[Environment]:
        env = Environment.open(settings)
        try:
            yield env
        finally:
            env.close()

    def describe(self, lake: str | None = None) -> dict[str, str | None]:
        """Where things go, with any password and query string removed (for logs and metadata)."""
        s = self.settings(lake)
        return {
            "home": str(s.home),
            "lake": redact_url(s.lake_url),
            "catalog": redact_url(s.catalog_url),
            "audit_dir": str(s.audit_dir),
            "audit_endpoint": redact_url(s.audit_endpoint) if s.audit_endpoint else None,
            "sources_base_dir": self.sources.base_dir,
        }
