"""Staging and production: two engine environments per rollout dataset, one decision engine.

Production is the engine's usual environment (`PCBO_HOME`, `PCBO_LAKE_URL`, `PCBO_CATALOG_URL`,
`PCBO_AUDIT_DIR`, a dataset's own `lake`). Staging is a second, separate one: its own lake, catalog
and audit backup, so nothing staging writes can be mistaken for production and the audit chains of
the two never mix. The rollout records (rollouts, approvals, soak evaluations, alerts) live in the
production catalog.

| staging setting | variable                     | default                                 |
|-----------------|------------------------------|-----------------------------------------|
| home            | `PCBO_STAGING_HOME`          | `$PCBO_HOME/staging`                    |
| lake            | `PCBO_STAGING_LAKE_URL`      | `$PCBO_STAGING_HOME/lake` (`rollout.stagingLake` wins) |
| catalog         | `PCBO_STAGING_CATALOG_URL`   | `sqlite:///$PCBO_STAGING_HOME/catalog.db` |
| audit backup    | `PCBO_STAGING_AUDIT_DIR`     | `$PCBO_STAGING_HOME/pas`                |
| audit endpoint  | `PCBO_STAGING_AUDIT_ENDPOINT`| none (local backup only)                |

Staging never falls back to a production variable: an unset staging setting takes its staging default.
With `PCBO_MULTI_HOST` staging runs on many hosts as production does: its catalog, lake and audit
backup must be shared stores too (`PCBO_STAGING_CATALOG_URL` a PostgreSQL database of its own,
`PCBO_STAGING_LAKE_URL` and `PCBO_STAGING_AUDIT_DIR` on an object store), else refused naming the variable.
A staging lake, catalog or audit backup that is production's (`PCBO_STAGING_HOME=$PCBO_HOME`, a
`rollout.stagingLake` naming the production lake), or a staging lake or audit backup inside
production's or holding it, is refused, naming the setting: a staging apply would write production
before any soak or approval (nested, each one's files are the other's `lake_path_unexpected`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pcbo_dagster.catalog.rollouts import RolloutStore
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.signed_note import VerifierKey, parse_verifier_key
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.settings import Settings, check_multi_host

STAGING = "staging"
PRODUCTION = "production"
STAGES = (STAGING, PRODUCTION)
STAGING_VARIABLES = {
    "home": "PCBO_STAGING_HOME",
    "lake": "PCBO_STAGING_LAKE_URL",
    "catalog": "PCBO_STAGING_CATALOG_URL",
    "audit_dir": "PCBO_STAGING_AUDIT_DIR",
    "audit_endpoint": "PCBO_STAGING_AUDIT_ENDPOINT",
}


def staging_settings(
    production: Settings, lake: str | None = None, environ: dict[str, str] | None = None, checked: bool = True
) -> Settings:
    """The staging settings beside `production`; `lake` (a dataset's `rollout.stagingLake`) wins.

    Staging runs where production's runs do: with `PCBO_MULTI_HOST` (production's) its stores must be
    shared as production's must (`check_multi_host`: a PostgreSQL catalog, an object-store lake and
    audit backup), or each host would keep its own staging chain on its own disk and lose it with the
    container. `checked`: refuse such settings (`InvalidInput` naming the `PCBO_STAGING_*` variable);
    False only to read where staging would be."""
    environ = dict(os.environ if environ is None else environ)
    home = environ.get(STAGING_VARIABLES["home"]) or str(production.home / STAGING)
    env = {k: v for k, v in environ.items() if k in ("PCBO_AUDIT_ATTEMPTS", "PCBO_AUDIT_INITIAL_WAIT")}
    env["PCBO_MULTI_HOST"] = "true" if production.multi_host else "false"
    staging = Settings.resolve(
        home=home,
        lake=lake or environ.get(STAGING_VARIABLES["lake"]) or None,
        catalog=environ.get(STAGING_VARIABLES["catalog"]) or None,
        audit_dir=environ.get(STAGING_VARIABLES["audit_dir"]) or None,
        audit_endpoint=environ.get(STAGING_VARIABLES["audit_endpoint"]) or None,
        env=env,
    )
    if checked:
        try:
            check_multi_host(staging)
        except InvalidInput as exc:
            names = {f"PCBO_{v}": f"PCBO_STAGING_{v}" for v in ("CATALOG_URL", "AUDIT_DIR", "LAKE_URL")}
            message = exc.message
            for production_name, staging_name in names.items():
                message = message.replace(production_name + "=", staging_name + "=")
            raise InvalidInput(names.get(exc.field, exc.field), f"staging: {message}") from None
    return staging


def dataset_settings(
    config: DatasetsConfig, dataset: DatasetConfig, base: Settings, environ: dict[str, str] | None = None
) -> dict[str, Settings]:
    """{"staging": ..., "production": ...} for a rollout dataset, its own lakes applied."""
    production = replace(base, lake_url=config.lake_url(dataset) or base.lake_url)
    environ = dict(os.environ if environ is None else environ)
    staging_lake = config.staging_lake_url(dataset)
    staging = staging_settings(base, staging_lake, environ)
    shared = {  # a lake or audit backup inside the other's shares its files: one's are the other's finding
        "lake": _overlap(_local(staging.lake_url), _local(production.lake_url)),
        "catalog": _database(staging.catalog_url) == _database(production.catalog_url),
        "audit_dir": _overlap(_local(staging.audit_location), _local(production.audit_location)),
    }
    for store, same in shared.items():
        if same:
            variable = STAGING_VARIABLES[store]
            field_name = (
                f"datasets[{dataset.name}].rollout.stagingLake"
                if store == "lake" and staging_lake
                else variable
                if environ.get(variable)
                else STAGING_VARIABLES["home"]
            )
            raise InvalidInput(
                field_name,
                f"staging's {store.replace('_', ' ')} is production's"
                + ("" if store == "catalog" else " (or lies inside it, or holds it)")
                + ": staging must be a separate "
                "environment (its own lake, catalog and audit backup), or what a staging apply writes "
                "is in production before any soak or approval",
            )
    return {STAGING: staging, PRODUCTION: production}


def _local(url: str) -> str:
    """A lake URL or path as one text per place: a local path absolute, a URL without a final `/`."""
    text = url[len("file://") :] if url.startswith("file://") else url
    return text.rstrip("/") if "://" in text else str(Path(text).expanduser().resolve())


def _overlap(one: str, other: str) -> bool:
    """Whether two places (`_local` texts) are one, or one holds the other."""
    return any(a == b or a.startswith(b.rstrip("/") + "/") for a, b in ((one, other), (other, one)))


def _database(url: str) -> str:
    """A catalog URL as one text per database: a SQLite file's absolute path, else the URL."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        return "sqlite:" + str(Path(str(parsed.database)).expanduser().resolve())
    return url


@dataclass(frozen=True)
class ApprovalPolicy:
    """Who may approve a dataset's rollouts (their verifier keys) and how many must
    (`rollout/approvals.py`)."""

    approvers: tuple[VerifierKey, ...] = ()
    required: int = 1


def approval_policy(rollout_config: Any) -> ApprovalPolicy:
    """The policy of a dataset's `rollout` config block (`approvers`, `requiredApprovals`)."""
    if rollout_config is None:
        return ApprovalPolicy()
    keys = tuple(parse_verifier_key(text) for text in rollout_config.approvers)
    return ApprovalPolicy(keys, rollout_config.requiredApprovals)


@dataclass
class RolloutEnvironments:
    """Both open environments of a rollout dataset and the rollout records."""

    staging: Environment
    production: Environment
    store: RolloutStore
    approval_policy: ApprovalPolicy = field(default_factory=ApprovalPolicy)

    def stage(self, name: str) -> Environment:
        if name == STAGING:
            return self.staging
        if name == PRODUCTION:
            return self.production
        raise ValueError(f"unknown stage {name!r}: staging or production")


@contextmanager
def open_environments(
    settings: dict[str, Settings], policy: ApprovalPolicy | None = None
) -> Iterator[RolloutEnvironments]:
    """Open staging and production (catalogs migrated); closed on exit. `policy`: the dataset's
    approvers (none: no approval can open its gate)."""
    production = Environment.open(settings[PRODUCTION])
    try:
        staging = Environment.open(settings[STAGING])
        try:
            yield RolloutEnvironments(
                staging, production, RolloutStore(production.catalog), policy or ApprovalPolicy()
            )
        finally:
            staging.close()
    finally:
        production.close()
