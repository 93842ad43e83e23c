"""The engine's adapters as separate Dagster `ConfigurableResource`s: catalog, lake, audit, sources.

Every field is optional. Unset, the engine resolves it exactly as the `pcbo` CLI does
(`engine.settings.Settings.resolve`): its environment variable, then the embedded default under
`PCBO_HOME` (`./.pcbo`). `from_env()` binds each variable that is set to its field as a Dagster
`EnvVar`, so the UI's resource page shows *which variable* configures a field, never its value (a
catalog URL with a password stays out of the UI). Anything these resources log or put into metadata
goes through `redact_url` (`describe()`).

| resource          | field          | variable               | default                                  |
|-------------------|----------------|------------------------|------------------------------------------|
| `CatalogResource` | `url`          | `PCBO_CATALOG_URL`     | `sqlite:///$PCBO_HOME/catalog.db`        |
| `LakeResource`    | `url`          | `PCBO_LAKE_URL`        | `$PCBO_HOME/lake` (a dataset's `lake` wins) |
| `AuditResource`   | `directory`    | `PCBO_AUDIT_DIR`       | `$PCBO_HOME/pas`                         |
|                   | `endpoint`     | `PCBO_AUDIT_ENDPOINT`  | none (local backup only)                 |
| `SourcesResource` | `base_dir`     | `PCBO_SOURCES_DIR`     | the datasets config file's directory     |
|                   | `config_path`  | `PCBO_DATASETS_CONFIG` | `examples/datasets.yaml` (informational) |
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from pcbo_dagster.engine.settings import redact_url
from pcbo_dagster.sources.record_files import resolve_uri

#: Resource -> {field: the environment variable bound to it when set}.
ENV_VARS: dict[str, dict[str, str]] = {
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
        return cls(**_bound(environ, ENV_VARS["CatalogResource"]))


class LakeResource(dg.ConfigurableResource):
    """The parquet lake (a path, `file://`, `s3://` or `gs://` URL). A dataset's own `lake` wins."""

    url: str | None = Field(default=None, description="Lake URL (PCBO_LAKE_URL); default $PCBO_HOME/lake")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> LakeResource:
        return cls(**_bound(environ, ENV_VARS["LakeResource"]))


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
        return cls(**_bound(environ, ENV_VARS["AuditResource"]))


class SourcesResource(dg.ConfigurableResource):
    """Where the records come from: relative source URIs resolve against `base_dir`.

    `base_dir` unset: the directory of the datasets config file (for the configured datasets) or of
    the request (`pcbo execute --dagster` sends it) for the request job. `config_path` records the
    datasets config the code location loaded (the definitions are built from it at load time).
    """

    base_dir: str | None = Field(
        default=None,
        description="Directory relative source URIs resolve against (PCBO_SOURCES_DIR); "
        "default the datasets config file's directory",
    )
    config_path: str | None = Field(
        default=None, description="The datasets config file (PCBO_DATASETS_CONFIG), informational"
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SourcesResource:
        return cls(**_bound(environ, ENV_VARS["SourcesResource"]))

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
