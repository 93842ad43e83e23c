"""Resources of the pcbo code location: the engine's adapters, and the engine composing them.

`PcboEngineResource` nests the four adapter resources (below: `CatalogResource`, `LakeResource`,
`AuditResource`, `SourcesResource`) plus `HomeResource` (`home`: `PCBO_HOME`, default `./.pcbo`), the
root of the engine's embedded defaults. Nested, each is fixed where the code location is built: no
launch's run config reaches any of them (a field of `PcboEngineResource` itself would be a default
the launchpad could override). An asset, a check, a sensor or the request job asks for `pcbo` and gets
one object that opens one engine `Environment` (lake + catalog + audit log), resolved exactly as
the `pcbo` CLI resolves its flags (`engine.settings.Settings.resolve`): an unset field falls back to
its environment variable, then to the embedded default.

`PcboEngineResource.from_env()` binds every `PCBO_*` variable that is set to its field as a Dagster
`EnvVar` (the UI shows the variable's name, not its value). Anything logged goes through
`describe()`, which removes passwords and query strings from URLs (`redact_url`).

    PcboEngineResource(home="/data/pcbo")                                   # embedded defaults there
    PcboEngineResource(catalog=CatalogResource(url=dg.EnvVar("PCBO_CATALOG_URL")),
                       lake=LakeResource(url="s3://bucket/lake"))

The adapters, one `ConfigurableResource` each:

Every field is optional. Unset, the engine resolves it exactly as the `pcbo` CLI does
(`engine.settings.Settings.resolve`): its environment variable, then the embedded default under
`PCBO_HOME` (`./.pcbo`). `from_env()` binds each variable that is set to its field as a Dagster
`EnvVar`, so the UI's resource page shows *which variable* configures a field, never its value (a
catalog URL with a password stays out of the UI). Anything these resources log or put into metadata
goes through `redact_url` (`describe()`).

| resource          | field          | variable               | default                                  |
|-------------------|----------------|------------------------|------------------------------------------|
| `HomeResource`    | `path`         | `PCBO_HOME`            | `./.pcbo`                                |
| `CatalogResource` | `url`          | `PCBO_CATALOG_URL`     | `sqlite:///$PCBO_HOME/catalog.db`        |
| `LakeResource`    | `url`          | `PCBO_LAKE_URL`        | `$PCBO_HOME/lake` (a dataset's `lake` wins) |
| `AuditResource`   | `directory`    | `PCBO_AUDIT_DIR`       | `$PCBO_HOME/pas`                         |
|                   | `endpoint`     | `PCBO_AUDIT_ENDPOINT`  | none (local backup only)                 |
| `SourcesResource` | `base_dir`     | `PCBO_SOURCES_DIR`     | the datasets config's `sources_dir`      |
|                   | `config_path`  | `PCBO_DATASETS_CONFIG` | the packaged example (informational)     |

A config's `sources_dir` is its file's directory, or `PCBO_HOME` for the packaged example
(`datasets/config.py`, `sources_dir_for`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from pcbo_dagster.catalog.source_indexes import LazyZoneIndexes, source_index_secret
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.io.redaction import redact_url
from pcbo_dagster.rollout.environments import staging_settings
from pcbo_dagster.sources.record_files import resolve_uri

#: Resource -> {field: the environment variable bound to it when set}.
ADAPTER_ENV_VARS: dict[str, dict[str, str]] = {
    "CatalogResource": {"url": "PCBO_CATALOG_URL"},
    "LakeResource": {"url": "PCBO_LAKE_URL"},
    "AuditResource": {"directory": "PCBO_AUDIT_DIR", "endpoint": "PCBO_AUDIT_ENDPOINT"},
    "SourcesResource": {"base_dir": "PCBO_SOURCES_DIR", "config_path": "PCBO_DATASETS_CONFIG"},
}


def _bound(environ: dict[str, str] | None, fields: dict[str, str]) -> dict[str, dg.EnvVar]:
    """`{field: EnvVar(variable)}` for each variable of `fields` that is set (and not empty)."""
    environ = dict(os.environ if environ is None else environ)
    return {field: dg.EnvVar(var) for field, var in fields.items() if environ.get(var)}


class CatalogResource(dg.ConfigurableResource):
    """The catalog database (SQLAlchemy URL: `sqlite:///...` or `postgresql://...`)."""

    url: str | None = Field(
        default=None, description="Catalog URL (PCBO_CATALOG_URL); default sqlite:///$PCBO_HOME/catalog.db"
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> CatalogResource:
        return cls(**_bound(environ, ADAPTER_ENV_VARS["CatalogResource"]))


class LakeResource(dg.ConfigurableResource):
    """The parquet lake (a path, `file://`, `s3://` or `gs://` URL). A dataset's own `lake` wins."""

    url: str | None = Field(default=None, description="Lake URL (PCBO_LAKE_URL); default $PCBO_HOME/lake")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> LakeResource:
        return cls(**_bound(environ, ADAPTER_ENV_VARS["LakeResource"]))


class AuditResource(dg.ConfigurableResource):
    """The audit emitter: the local backup directory (always written first) and the remote endpoint."""

    directory: str | None = Field(
        default=None, description="Local audit backup directory (PCBO_AUDIT_DIR); default $PCBO_HOME/pas"
    )
    endpoint: str | None = Field(
        default=None, description="HTTP endpoint audit events are delivered to (PCBO_AUDIT_ENDPOINT)"
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AuditResource:
        return cls(**_bound(environ, ADAPTER_ENV_VARS["AuditResource"]))


class SourcesResource(dg.ConfigurableResource):
    """Where the records come from: relative source URIs resolve against `base_dir`.

    `base_dir` unset: the datasets config's `sources_dir` (its file's directory; `PCBO_HOME` for the
    packaged example), and for the request job the request's directory (`pcbo execute --dagster`
    sends it) when known. `config_path` records the
    datasets config the code location loaded (the definitions are built from it at load time).
    """

    base_dir: str | None = Field(
        default=None,
        description="Directory relative source URIs resolve against (PCBO_SOURCES_DIR); "
        "default the datasets config's directory (PCBO_HOME for the packaged example)",
    )
    config_path: str | None = Field(
        default=None, description="The datasets config file (PCBO_DATASETS_CONFIG), informational"
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SourcesResource:
        return cls(**_bound(environ, ADAPTER_ENV_VARS["SourcesResource"]))

    def base(self, default: str | os.PathLike[str] | None = None) -> Path | None:
        """The directory relative URIs resolve against: `base_dir`, else `default`."""
        if self.base_dir:
            return Path(self.base_dir).expanduser().resolve()
        return None if default is None else Path(default).resolve()

    def resolve(self, uri: str, default_base: str | os.PathLike[str] | None = None) -> str:
        """`uri` as the engine reads it: a URL or absolute path unchanged, a relative path made absolute."""
        return resolve_uri(uri, self.base(default_base))

    def describe(self) -> dict[str, str | None]:
        return {
            "base_dir": self.base_dir,
            "config_path": None if self.config_path is None else redact_url(self.config_path),
        }


class HomeResource(dg.ConfigurableResource):
    """`PCBO_HOME`, the root of the engine's embedded defaults. A resource of its own, nested in
    `PcboEngineResource`, never a field of it: Dagster takes a resource's field given in code as a
    default that any launch's run config may override (`resources: {pcbo: {config: {home: ...}}}`),
    and a nested resource's fields as fixed."""

    path: str | None = Field(
        default=None, description="PCBO_HOME, root of the embedded defaults; default ./.pcbo"
    )


class PcboEngineResource(dg.ConfigurableResource):
    """The lake, the catalog, the audit emitter and the sources the engine uses (one `Environment`).
    Every setting is in a nested resource, so no run config (a launchpad, a sensor's run request)
    changes where the engine's stores are: the resource takes no run config at all."""

    root: HomeResource
    catalog: CatalogResource
    lake: LakeResource
    audit: AuditResource
    sources: SourcesResource

    def __init__(
        self,
        *,
        home: str | None = None,
        root: HomeResource | None = None,
        catalog: CatalogResource | None = None,
        lake: LakeResource | None = None,
        audit: AuditResource | None = None,
        sources: SourcesResource | None = None,
        **kwargs: Any,
    ) -> None:
        # Dagster resources cannot default a nested resource: an omitted adapter is an unset one.
        # (`root`: Dagster builds the resource again from its fields when a run starts.)
        super().__init__(  # type: ignore[call-arg]  # Dagster's pydantic fields, not typed here
            root=root if root is not None else HomeResource(path=home),
            catalog=catalog if catalog is not None else CatalogResource(),
            lake=lake if lake is not None else LakeResource(),
            audit=audit if audit is not None else AuditResource(),
            sources=sources if sources is not None else SourcesResource(),
            **kwargs,
        )

    @property
    def home(self) -> str | None:
        """`PCBO_HOME` as configured (an `EnvVar` until Dagster resolves it at run time)."""
        return self.root.path

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
    def environment(self, lake: str | None = None, actor: str | None = None) -> Iterator[Environment]:
        """An open engine `Environment` (catalog migrated), closed on exit; `actor` is named in the
        audit events it appends (a run submitted by the HTTP API: the token's subject)."""
        with self._open(self.settings(lake), actor) as env:
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
    def zone_indexes(self) -> Iterator[LazyZoneIndexes]:
        """The catalog's zone indexes of streamed sources (opened when first used, closed on exit):
        range runs on any host read only the zones of their range (`sources/zones.py`)."""
        settings = self.settings()
        store = LazyZoneIndexes(settings.catalog_url, source_index_secret(settings.home))
        try:
            yield store
        finally:
            store.close()

    @contextmanager
    def _open(self, settings: Settings, actor: str | None = None) -> Iterator[Environment]:
        env = Environment.open(settings, actor=actor)
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
            "audit_store": redact_url(s.audit_store) if s.audit_store else None,
            "audit_endpoint": redact_url(s.audit_endpoint) if s.audit_endpoint else None,
            "sources_base_dir": self.sources.base_dir,
        }
