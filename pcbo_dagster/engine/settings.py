"""Where the engine reads and writes (CONTRACT section 7), from flags, then environment, then defaults.

| setting        | flag               | variable              | default                          |
|----------------|--------------------|-----------------------|----------------------------------|
| home           | `--home`           | `PCBO_HOME`           | `./.pcbo`                        |
| lake           | `--lake`           | `PCBO_LAKE_URL`       | `$PCBO_HOME/lake`                |
| catalog        | `--catalog`        | `PCBO_CATALOG_URL`    | `sqlite:///$PCBO_HOME/catalog.db`|
| audit backup   | `--audit-dir`      | `PCBO_AUDIT_DIR`      | `$PCBO_HOME/pas`                 |
| audit cache    |                    | `PCBO_AUDIT_CACHE_DIR`| `$PCBO_HOME/pas-cache`           |
| audit endpoint | `--audit-endpoint` | `PCBO_AUDIT_ENDPOINT` | none (local backup only)         |
| parallel       | `--parallel`       | `PCBO_PARALLEL`       | local lake 1 (ledgers 2), else 4 |
| signing key    | `--signing-key`    | `PCBO_SIGNING_KEY`    | none: no checkpoint is signed    |
| witnesses      | `--witness` (many) | `PCBO_WITNESSES`      | none                             |
| origin prefix  |                    | `PCBO_CHECKPOINT_ORIGIN_PREFIX` | `pcbo/`                |
| SQL targets    | `--target-url`     | `PCBO_SQL_TARGET_URLS`| none (the URL recorded on the chain) |
| many hosts     |                    | `PCBO_MULTI_HOST`     | false                            |

`sql_target_urls` are how `verify` and `rollback` connect to the SQL tables the audit chain names
(the chain keeps a target's URL without credentials): a URL given here is used for the recorded
target with the same location (scheme, host, port, database). Passwords belong in `PGPASSWORD` or
`~/.pgpass`, not in a URL.

`parallel` is how many partitions `execute` reads, encodes and writes at once (audit events are
still appended one after another, in partition order). Its default is what measured fastest for the
lake's kind and the request's source (`default_parallel`): 1 on a local disk, where most of a
partition's work holds the GIL and threads only add switching, except 2 for a ledger archive, whose
partitions are mostly parquet encoding of large XDR values (which runs without the GIL); 4 on an
object store, where each partition waits on round trips. `parallel_given` says whether the flag or
the variable chose it (then it holds whatever the source).

The audit backup is a local directory, or an `s3://` / `gs://` URL (`audit_store`): then the durable
copy of every chain is on that object store (`audit.object_store_backup`) and `audit_dir` is this
host's cache of it (`PCBO_AUDIT_CACHE_DIR`). `PCBO_MULTI_HOST=true` says runs of one dataset may run
on several hosts (the Celery, Kubernetes and Docker deployments set it): `check_multi_host` then
refuses what only works on one host (see there).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pcbo_dagster.audit.object_store_backup import SHARED_SCHEMES, is_shared_store
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.io.env_vars import flag, plain_path, positive_int, positive_number
from pcbo_dagster.io.redaction import has_query, has_userinfo, redact_url, userinfo_refused

#: Partitions `execute` stages at once on an object-store lake unless `--parallel` / `PCBO_PARALLEL`
#: say otherwise (`default_parallel`).
DEFAULT_PARALLEL = 4
#: The same on a local lake (a path or `file://`): threads gain nothing there (README, *Performance*).
DEFAULT_PARALLEL_LOCAL = 1
#: The same on a local lake for a request whose source is a ledger archive (issue 18: 2,048 realistic
#: ledgers in 18.8 s with 2 against 23.5 s with 1, on a 2-core machine; README, *Performance*).
DEFAULT_PARALLEL_LOCAL_LEDGERS = 2


def default_parallel(lake_url: str, source_kind: str | None = None) -> int:
    """The fastest `parallel` measured for a lake of this kind and a request's source (its
    `LoadedRequest.source_kind`, None when not known): for a local path or `file://` URL 1, or
    `DEFAULT_PARALLEL_LOCAL_LEDGERS` for a ledger archive; `DEFAULT_PARALLEL` for an object store
    (`s3://`, `gs://`, ...)."""
    scheme = lake_url.split("://", 1)[0].lower() if "://" in lake_url else "file"
    if scheme not in ("file", "local"):
        return DEFAULT_PARALLEL
    return DEFAULT_PARALLEL_LOCAL_LEDGERS if source_kind == "ledger_archive" else DEFAULT_PARALLEL_LOCAL


def store_location(name: str, text: str | None) -> str | None:
    """`text`, a lake or audit store location given by the flag or variable `name`: a local path, a
    `file://` URL, or an `s3://` / `gs://` URL with a bucket and without credentials, a query string
    or a fragment (`InvalidInput` naming `name` otherwise, the URL redacted). Object stores take
    credentials from the environment; s3fs / gcsfs would keep a query or fragment in the name of every
    object written (or read it as a version); `s3://` with no bucket would lose its slashes and be a
    local directory `s3:`; fsspec knows no other scheme pcbo may write to."""
    if text is None or "://" not in text:
        return text
    if has_userinfo(text):
        raise InvalidInput(name, userinfo_refused(text))
    scheme, rest = text.split("://", 1)
    if scheme not in ("file", *SHARED_SCHEMES):
        raise InvalidInput(
            name, f"{redact_url(text)}: a lake or audit store is a local path, file://, s3:// or gs:// URL"
        )
    if scheme != "file" and not rest.split("/", 1)[0]:
        raise InvalidInput(name, f"{redact_url(text)}: no bucket (s3://bucket/prefix, gs://bucket/prefix)")
    if has_query(text):
        raise InvalidInput(
            name,
            f"{redact_url(text)}: a lake or audit store URL takes no query string or fragment "
            "(an object store would keep it in the name of every object written, or read it as "
            "a version): credentials come from the environment",
        )
    return text


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
    #: The operator's signing key file (checkpoints, evidence packages); None: nothing is signed.
    signing_key: Path | None = None
    #: Witnesses asked to cosign each checkpoint: `<cosigner vkey> <URL>` each.
    witnesses: tuple[str, ...] = ()
    checkpoint_origin_prefix: str = "pcbo/"
    #: How an error about the signing key names it: the flag or the variable it came from.
    signing_key_field: str = "PCBO_SIGNING_KEY"
    witnesses_field: str = "PCBO_WITNESSES"
    sql_target_urls: tuple[str, ...] = ()
    #: How an error about them names them: `--target-url` or `PCBO_SQL_TARGET_URLS`.
    sql_target_urls_field: str = "PCBO_SQL_TARGET_URLS"
    #: The durable audit backup on an object store every host shares (`s3://`, `gs://`), or None.
    audit_store: str | None = None
    #: Runs of one dataset may land on different hosts (`PCBO_MULTI_HOST`).
    multi_host: bool = False
    #: `parallel` came from `--parallel` or `PCBO_PARALLEL` (else it is the lake's default, and a run
    #: takes `default_parallel` for its source).
    parallel_given: bool = False
    #: How an error about the catalog names it: `--catalog` or `PCBO_CATALOG_URL` when it came from one,
    #: else `--home` (the home's own catalog).
    catalog_field: str = "--home"

    @property
    def audit_location(self) -> str:
        """Where the durable audit backup is: the object-store URL, else the local directory."""
        return self.audit_store or str(self.audit_dir)

    def own_paths(self, environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
        """The files and directories pcbo writes for these settings (its stores, as configured, and
        what it keeps under its home), which a server never reads as a source though its sources
        directory (`$PCBO_HOME` by default) may hold them: the lake (a local one), the audit backup
        and its cache, a SQLite catalog and the embedded Iceberg catalog with their journals, the
        signing key, and under the home `.keys`, `evidence`, `reports`, `rollback_scripts` and the
        rollout's `staging` home (`PCBO_REPORTS_DIR`, `PCBO_STAGING_HOME` where they move them), and
        the decision spill directory when `PCBO_SPILL_DIR` names one (it holds other runs' records)."""
        # Imported here: a server asks once, at start, and the CLI never.
        from pcbo_dagster.engine.sql_apply import ROLLBACK_SCRIPTS_DIR
        from pcbo_dagster.tables.iceberg_publication import CATALOG_ENV, EMBEDDED_CATALOG_FILE

        env = os.environ if environ is None else environ
        home = self.home
        paths = [home / name for name in (".keys", "pas", "pas-cache", "evidence", ROLLBACK_SCRIPTS_DIR)]
        paths += [home / "reports", home / "staging", self.audit_dir]
        for variable in ("PCBO_REPORTS_DIR", "PCBO_STAGING_HOME", "PCBO_SPILL_DIR"):
            if env.get(variable):
                paths.append(Path(env[variable]).expanduser())
        lake = self.lake_url[len("file://") :] if self.lake_url.startswith("file://") else self.lake_url
        if "://" not in lake:
            paths.append(Path(lake).expanduser())
        if self.signing_key is not None:
            paths.append(self.signing_key)
        databases = [
            self.catalog_url,
            f"sqlite:///{home / EMBEDDED_CATALOG_FILE}",
            env.get(CATALOG_ENV) or "",
        ]
        for url in databases:
            if _is_sqlite(url) and make_url(url).database not in (None, "", ":memory:"):
                database = Path(str(make_url(url).database)).expanduser()
                paths += [database.with_name(database.name + end) for end in ("", "-wal", "-shm", "-journal")]
        return tuple(path.resolve() for path in paths)

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
        signing_key: str | None = None,
        witnesses: list[str] | None = None,
        sql_target_urls: list[str] | None = None,
    ) -> Settings:
        env = dict(os.environ if env is None else env)

        def given(flag: str, value: str | None, variable: str, store: bool = False) -> str | None:
            """The flag's value, else the variable's; a `store` (lake, audit backup): `store_location`."""
            name, text = (flag, value) if value is not None else (variable, env.get(variable) or None)
            text = plain_path(name, text)
            return store_location(name, text) if store else text

        home_path = home_dir(given("--home", home, "PCBO_HOME"), {})
        lake_url = given("--lake", lake, "PCBO_LAKE_URL", store=True) or str(home_path / "lake")
        catalog_url = given("--catalog", catalog, "PCBO_CATALOG_URL")
        catalog_field = (
            "--home" if catalog_url is None else "--catalog" if catalog is not None else "PCBO_CATALOG_URL"
        )
        if catalog_url is not None:
            _check_catalog_url(catalog_field, catalog_url)
        catalog_url = catalog_url or f"sqlite:///{home_path / 'catalog.db'}"
        audit_text = given("--audit-dir", audit_dir, "PCBO_AUDIT_DIR", store=True)
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
        if endpoint is not None:
            _check_audit_endpoint(
                "--audit-endpoint" if audit_endpoint is not None else "PCBO_AUDIT_ENDPOINT", endpoint
            )
        attempts = positive_int("PCBO_AUDIT_ATTEMPTS", env.get("PCBO_AUDIT_ATTEMPTS"), 3)
        wait = positive_number("PCBO_AUDIT_INITIAL_WAIT", env.get("PCBO_AUDIT_INITIAL_WAIT"), 0.5)
        workers = (
            parallel
            if parallel is not None
            else parse_parallel(env.get("PCBO_PARALLEL"), default_parallel(lake_url))
        )
        if workers < 1:
            raise InvalidInput("--parallel", f"must be at least 1, not {workers}")
        targets = tuple(sql_target_urls or (env.get("PCBO_SQL_TARGET_URLS") or "").split())
        targets_field = "--target-url" if sql_target_urls else "PCBO_SQL_TARGET_URLS"
        _check_target_urls(targets_field, targets)
        key = given("--signing-key", signing_key, "PCBO_SIGNING_KEY")
        if witnesses:
            witness_list = tuple(w.strip() for w in witnesses)
        else:
            entries = re.split(r"[;\n]", env.get("PCBO_WITNESSES", ""))
            witness_list = tuple(w.strip() for w in entries if w.strip())
        _check_iceberg_catalog_url(env)
        prefix = env.get("PCBO_CHECKPOINT_ORIGIN_PREFIX", "pcbo/")
        if not prefix or any(c.isspace() or c == "+" for c in prefix):
            raise InvalidInput("PCBO_CHECKPOINT_ORIGIN_PREFIX", "must be non-empty, without spaces or '+'")
        return cls(
            home_path,
            lake_url,
            catalog_url,
            audit,
            endpoint,
            attempts,
            wait,
            workers,
            Path(key).expanduser().resolve() if key else None,
            witness_list,
            prefix,
            "--signing-key" if signing_key is not None else "PCBO_SIGNING_KEY",
            "--witness" if witnesses else "PCBO_WITNESSES",
            targets,
            audit_store=store,
            multi_host=flag("PCBO_MULTI_HOST", env.get("PCBO_MULTI_HOST")),
            parallel_given=parallel is not None or bool((env.get("PCBO_PARALLEL") or "").strip()),
            catalog_field=catalog_field,
            sql_target_urls_field=targets_field,
        )


def _check_target_urls(name: str, urls: tuple[str, ...]) -> None:
    """Each SQL target URL given (`--target-url`, `PCBO_SQL_TARGET_URLS`) must be one a target can be
    opened at, as a target's own URL is (`parse_target_url`, `dialect_of`): one that is not was
    skipped when matched against the location the chain records, and the recorded location (no user)
    used instead, the typo never reported. `InvalidInput` naming `name`, the URL not shown."""
    from pcbo_dagster.targets.sql_dialects import dialect_of, parse_target_url

    for url in urls:
        plain_path(name, url)
        try:
            dialect_of(parse_target_url(url))
        except InvalidInput as exc:
            raise InvalidInput(name, exc.message) from None


def _check_iceberg_catalog_url(env: Mapping[str, str]) -> None:
    """`PCBO_ICEBERG_CATALOG_URL` (the Iceberg catalog of a table that names none) is read when a
    table is published, once the lake holds the run's partitions: checked here, before anything is
    written, as a table's own `catalog` is — a SQL or REST catalog URL, and not an in-memory SQLite
    catalog, whose tables would be gone when the command ends."""
    from pcbo_dagster.core.request_model import is_table_catalog_url
    from pcbo_dagster.tables.iceberg_publication import CATALOG_ENV

    name, url = CATALOG_ENV, env.get(CATALOG_ENV) or None
    if url is None:
        return
    plain_path(name, url)
    if not is_table_catalog_url(url):
        raise InvalidInput(
            name, f"{redact_url(url)} is not a sqlite://, postgresql:// or http(s):// (REST) catalog URL"
        )
    if _is_sqlite(url) and make_url(url).database in (None, "", ":memory:"):
        raise InvalidInput(
            name, "an in-memory SQLite catalog is gone when the command ends: give sqlite:///PATH"
        )


def _check_audit_endpoint(name: str, url: str) -> None:
    """`InvalidInput` naming the flag or variable `name` unless `url` is an endpoint audit events can
    be delivered to (as `HttpDelivery` checks it: http(s), a host, nothing http.client refuses), so a
    bad one is found before anything is written, not once the catalog exists."""
    from pcbo_dagster.audit.delivery import HttpDelivery

    try:
        HttpDelivery(url)  # what Environment.open makes of it
    except ValueError as exc:
        raise InvalidInput(name, str(exc)) from None


def _check_catalog_url(name: str, url: str) -> None:
    """`InvalidInput` naming the flag or variable `name` unless `url` names a catalog that outlives the
    command: SQLite (a file) or PostgreSQL. An in-memory SQLite catalog would take the runs' records,
    leases and chain heads with it when the process ends, leaving a lake and an audit backup that no
    catalog describes."""
    from pcbo_dagster.catalog.database import is_sqlite_memory

    try:
        memory = is_sqlite_memory(url)
    except ValueError as exc:
        raise InvalidInput(name, str(exc)) from None
    if memory:
        raise InvalidInput(
            name,
            "an in-memory SQLite catalog is gone when the command ends: give sqlite:///PATH or postgresql://",
        )


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


def parse_parallel(text: str | None, default: int = DEFAULT_PARALLEL) -> int:
    """`PCBO_PARALLEL`: a positive integer; unset or empty means `default`."""
    return positive_int("PCBO_PARALLEL", text, default)
