"""Where the engine reads and writes (CONTRACT section 7), from flags, then environment, then defaults.

| setting        | flag               | variable              | default                          |
|----------------|--------------------|-----------------------|----------------------------------|
| home           | `--home`           | `PCBO_HOME`           | `./.pcbo`                        |
| lake           | `--lake`           | `PCBO_LAKE_URL`       | `$PCBO_HOME/lake`                |
| catalog        | `--catalog`        | `PCBO_CATALOG_URL`    | `sqlite:///$PCBO_HOME/catalog.db`|
| audit backup   | `--audit-dir`      | `PCBO_AUDIT_DIR`      | `$PCBO_HOME/pas`                 |
| audit cache    |                    | `PCBO_AUDIT_CACHE_DIR`| `$PCBO_HOME/pas-cache`           |
| audit endpoint | `--audit-endpoint` | `PCBO_AUDIT_ENDPOINT` | none (local backup only)         |
| parallel       | `--parallel`       | `PCBO_PARALLEL`       | 4 (1: one partition at a time)   |
| many hosts     |                    | `PCBO_MULTI_HOST`     | false                            |

`parallel` is how many partitions `execute` reads, encodes and writes at once (audit events are
still appended one after another, in partition order).

The audit backup is a local directory, or an `s3://` / `gs://` URL (`audit_store`): then the durable
copy of every chain is on that object store (`audit.object_store_backup`) and `audit_dir` is this
host's cache of it (`PCBO_AUDIT_CACHE_DIR`). `PCBO_MULTI_HOST=true` says runs of one dataset may run
on several hosts (the Celery, Kubernetes and Docker deployments set it): `check_multi_host` then
refuses what only works on one host (see there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pcbo_dagster.audit.object_store_backup import is_shared_store
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.io.env_vars import flag, plain_path, positive_int, positive_number
from pcbo_dagster.io.redaction import redact_url

#: Partitions `execute` stages at once unless `--parallel` / `PCBO_PARALLEL` say otherwise.
DEFAULT_PARALLEL = 4


def home_dir(home: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """`home`, else `PCBO_HOME`, else `./.pcbo`: the root of the embedded defaults, made absolute."""
    env = os.environ if env is None else env
    return Path(home or env.get("PCBO_HOME") or ".pcbo").expanduser().resolve()


@dataclass(frozen=True)
class Settings:
    home: Path
    lake_url: str
    catalog_url: str
    #: The local audit backup, or this host's cache of `audit_store`.
    audit_dir: Path
    audit_endpoint: str | None = None
    audit_attempts: int = 3
    audit_initial_wait: float = 0.5
    parallel: int = DEFAULT_PARALLEL
    #: The durable audit backup on an object store every host shares (`s3://`, `gs://`), or None.
    audit_store: str | None = None
    #: Runs of one dataset may land on different hosts (`PCBO_MULTI_HOST`).
    multi_host: bool = False

    @property
    def audit_location(self) -> str:
        """Where the durable audit backup is: the object-store URL, else the local directory."""
        return self.audit_store or str(self.audit_dir)

    @classmethod
    def resolve(
        cls,
        home: str | None = None,
        lake: str | None = None,
        catalog: str | None = None,
        audit_dir: str | None = None,
        audit_endpoint: str | None = None,
        env: dict[str, str] | None = None,
        parallel: int | None = None,
    ) -> Settings:
        env = dict(os.environ if env is None else env)

        def given(flag: str, value: str | None, variable: str) -> str | None:
            if value is not None:
                return plain_path(flag, value)
            return plain_path(variable, env.get(variable) or None)

        home_path = home_dir(given("--home", home, "PCBO_HOME"), {})
        lake_url = given("--lake", lake, "PCBO_LAKE_URL") or str(home_path / "lake")
        catalog_url = (
            given("--catalog", catalog, "PCBO_CATALOG_URL") or f"sqlite:///{home_path / 'catalog.db'}"
        )
        audit_text = given("--audit-dir", audit_dir, "PCBO_AUDIT_DIR")
        store = None
        if audit_text is not None and is_shared_store(audit_text):
            store = audit_text.rstrip("/")
            audit_text = given("PCBO_AUDIT_CACHE_DIR", None, "PCBO_AUDIT_CACHE_DIR") or str(
                home_path / "pas-cache"
            )
        elif audit_text is not None and audit_text.startswith("file://"):
            audit_text = audit_text[len("file://") :]
        audit = Path(audit_text or home_path / "pas").expanduser().resolve()
        endpoint = given("--audit-endpoint", audit_endpoint, "PCBO_AUDIT_ENDPOINT")
        attempts = positive_int("PCBO_AUDIT_ATTEMPTS", env.get("PCBO_AUDIT_ATTEMPTS"), 3)
        wait = positive_number("PCBO_AUDIT_INITIAL_WAIT", env.get("PCBO_AUDIT_INITIAL_WAIT"), 0.5)
        workers = parallel if parallel is not None else parse_parallel(env.get("PCBO_PARALLEL"))
        if workers < 1:
            raise InvalidInput("--parallel", f"must be at least 1, not {workers}")
        many = flag("PCBO_MULTI_HOST", env.get("PCBO_MULTI_HOST"))
        return cls(home_path, lake_url, catalog_url, audit, endpoint, attempts, wait, workers, store, many)


def _is_sqlite(url: str) -> bool:
    try:
        return make_url(url).get_backend_name() == "sqlite"
    except ArgumentError:
        return False


def check_multi_host(settings: Settings) -> None:
    """Refuse (`InvalidInput`, naming the variable) a configuration that would lose or fork history
    when runs of a dataset land on different hosts.

    - A SQLite catalog, with `PCBO_MULTI_HOST` or an audit backup on an object store: a SQLite file
      is one host's, and the catalog's locks (PostgreSQL's row and advisory locks) are what serialise
      the commits of a dataset across hosts.
    - With `PCBO_MULTI_HOST`: a local audit directory (it would be the only copy of events the other
      hosts never see) and a local lake (each host would write its own disk).
    """
    shared_audit = settings.audit_store is not None
    if (settings.multi_host or shared_audit) and _is_sqlite(settings.catalog_url):
        why = "PCBO_MULTI_HOST is set" if settings.multi_host else "the audit backup is on an object store"
        raise InvalidInput(
            "PCBO_CATALOG_URL",
            f"a SQLite catalog ({redact_url(settings.catalog_url)}) is one host's file, and {why}: runs on "
            "several hosts must share one PostgreSQL catalog, whose locks serialise each dataset's commits "
            "across hosts (PCBO_CATALOG_URL=postgresql://user@host/db)",
        )
    if not settings.multi_host:
        return
    if not shared_audit:
        raise InvalidInput(
            "PCBO_AUDIT_DIR",
            f"with PCBO_MULTI_HOST the audit backup must be on an object store every host shares "
            f"(s3://bucket/prefix or gs://bucket/prefix), not the local directory {settings.audit_dir}: "
            "host-local files may only be caches, never the only copy of a chain",
        )
    if not is_shared_store(settings.lake_url):
        raise InvalidInput(
            "PCBO_LAKE_URL",
            f"with PCBO_MULTI_HOST the lake must be an s3:// or gs:// URL every host shares, not "
            f"{redact_url(settings.lake_url)} (each host would write its own disk)",
        )


def parse_parallel(text: str | None) -> int:
    """`PCBO_PARALLEL`: a positive integer; unset or empty means the default."""
    return positive_int("PCBO_PARALLEL", text, DEFAULT_PARALLEL)
