"""Plan, dry-run and execute of a request given as bytes: the one path the `pcbo` commands, the HTTP
API (`pcbo serve`) and a submission to Dagster share (load and validate, evaluate, check the gates,
open the environment, execute).

Each takes the request's bytes, or the `ValidatedRequest` a caller already made of them. Errors are
the engine's (`core/errors.py`): `InvalidInput` (exit 2, HTTP 422), `Blocked` (exit 3,
HTTP 409), anything else (exit 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcbo_dagster.core.decisions import Decisions
from pcbo_dagster.core.plan import Plan
from pcbo_dagster.engine.request_loading import LoadedRequest, ValidatedRequest, evaluate, load_request
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.sources.local_files import SourcesDirectory

if TYPE_CHECKING:
    from pcbo_dagster.engine.sql_apply import ChainReader

#: Given the number of partitions an execute is about to write, a context that yields the callback
#: told how many more partitions are done (or None for no progress reports): the CLI's progress bar,
#: the HTTP API's run progress events.
ProgressFactory = Callable[[int], AbstractContextManager[Callable[[int], None] | None]]


@dataclass
class EvaluatedRequest:
    loaded: LoadedRequest
    plan: Plan
    decisions: Decisions

    def close(self) -> None:
        self.loaded.close()


def plan_document(
    raw: bytes | ValidatedRequest, base_dir: Path | None = None, confine_to: SourcesDirectory | None = None
) -> dict[str, Any]:
    """The plan document of a request (`pcbo plan`, `POST /v1/plan`)."""
    loaded = load_request(raw, base_dir, confine_to)
    try:
        return loaded.plan().to_json()
    finally:
        loaded.close()


def evaluate_request(
    raw: bytes | ValidatedRequest,
    base_dir: Path | None = None,
    confine_to: SourcesDirectory | None = None,
    settings: Settings | Callable[[], Settings] | None = None,
    *,
    table_checks: bool = True,
) -> EvaluatedRequest:
    """Load and evaluate a request; the caller closes it (or leaves that to the process exit) once
    done with its decisions, which a streamed source reads from its spill as they are iterated.
    `settings` (or how to resolve them): the deployment whose audit chain, read once and verified
    (`sql_apply.deployment_chain_reader`; read only, nothing written), says which journal of a SQL
    target's run is its own and, for a dry-run, which Iceberg table an earlier run declared the
    dataset version publishes to. `table_checks` (a dry-run, which promises what execute will do):
    a request that publishes to an Iceberg table refused as execute refuses it
    (`refuse_table_request`: another table than the declared one, columns the table cannot have); an
    execute checks it itself, under its lock (`iceberg_publication.publisher_for`)."""
    loaded = load_request(raw, base_dir, confine_to)
    try:
        chain = None
        if settings is not None and (table_checks or loaded.request.target is not None):
            from pcbo_dagster.engine.sql_apply import deployment_chain_reader

            chain = deployment_chain_reader(settings)
        plan, decisions = evaluate(loaded, chain)
        if table_checks:
            refuse_table_request(loaded, plan, decisions, chain, settings)
    except BaseException:
        loaded.close()
        raise
    return EvaluatedRequest(loaded, plan, decisions)


def refuse_table_request(
    loaded: LoadedRequest,
    plan: Plan,
    decisions: Decisions,
    chain: ChainReader | None = None,
    settings: Settings | Callable[[], Settings] | None = None,
) -> None:
    """`InvalidInput` (exit 2) for what execute refuses of a request that publishes to an Iceberg
    table, before it writes anything, by the execute's own checks: a request's `table` other than the
    one its dataset version's chain declares for its main branch
    (`iceberg_publication.refuse_another_table`, field `table`), or, where the chain declares none,
    a table another dataset version holds (`iceberg_publication.refuse_another_datasets_table`: the
    catalog's rows, the table's own property; read through `sql_apply.read_only_deployment`, nothing
    created), then the first column of its run
    the table cannot have, naming its field (a reserved or case-colliding name:
    `iceberg_publication.refuse_column_names`, on the run's schema). The table is the request's
    `table`, else the one the chain declares (`iceberg_publication.declared_publications`), as
    execute's `resolve_target` finds it. `chain`: how to read the deployment's chain
    (`sql_apply.deployment_chain`: verified as every decision's is, `ChainNotVerified` exit 1 for one
    that does not verify, as execute refuses it), and `settings` (or how to resolve them): the
    deployment's, which resolve where the request's `table` is (`iceberg_publication.catalog_url_for`:
    nothing opened); either None (a caller without settings): only the request's `table`'s columns
    are checked. No table: nothing to check."""
    from pcbo_dagster.engine.transparency_log import operator_verifier_of
    from pcbo_dagster.io.redaction import redact_url
    from pcbo_dagster.tables.iceberg_publication import (
        MAIN_BRANCH,
        catalog_url_for,
        declared_publications,
        partition_field_names,
        refuse_another_datasets_table,
        refuse_another_table,
        refuse_column_names,
        target_for,
    )

    if settings is not None and not isinstance(settings, Settings):
        settings = settings()
    declared = None
    if chain is not None:
        state, _ = chain(plan.dataset, plan.version_label)
        verifier = None if settings is None else operator_verifier_of(settings)
        declared = declared_publications(state.other, verifier).get(MAIN_BRANCH)
    spec = loaded.request.table
    if spec is None and declared is None:
        return
    if spec is not None and declared is not None and settings is not None:
        catalog = catalog_url_for(spec.catalog, settings.home, settings.catalog_url)
        refuse_another_table(redact_url(catalog), spec.name, declared, plan.dataset, plan.version_label)
    elif spec is not None and settings is not None:
        from pcbo_dagster.engine.sql_apply import read_only_deployment

        with read_only_deployment(settings) as deployment:
            if deployment.env is not None:
                target = target_for(spec, deployment.env)
                refuse_another_datasets_table(deployment.env, target, plan.dataset, plan.version_label)
    schema, _ = loaded.schema_of(decisions.partitions)
    refuse_column_names(
        schema.names,
        partition_field_names(plan),
        lambda column: loaded.field_of(column, decisions.partitions),
    )


@contextmanager
def evaluated_request(
    raw: bytes | ValidatedRequest,
    base_dir: Path | None = None,
    confine_to: SourcesDirectory | None = None,
    settings: Settings | None = None,
) -> Iterator[EvaluatedRequest]:
    """`evaluate_request` for an execute (which checks a table's columns itself), closed when the
    block ends."""
    evaluated = evaluate_request(raw, base_dir, confine_to, settings, table_checks=False)
    try:
        yield evaluated
    finally:
        evaluated.close()


def check_request_gates(evaluated: EvaluatedRequest) -> None:
    """`Blocked` (exit 3 / HTTP 409, nothing written) when a gate holds."""
    from pcbo_dagster.engine.execute import check_gates

    check_gates(evaluated.loaded, evaluated.decisions)


def execute_evaluated(
    settings: Settings,
    evaluated: EvaluatedRequest,
    *,
    actor: str | None = None,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Gate, then execute an evaluated request in the environment `settings` name; `actor` (the HTTP
    API's token subject) is named in every audit event the execute appends."""
    from pcbo_dagster.engine.environment import Environment
    from pcbo_dagster.engine.execute import execute

    # The request's own table's columns, refused before anything is written (the home, the catalog,
    # the lock files); the table its chain declares is checked under the lock (`publisher_for`).
    refuse_table_request(evaluated.loaded, evaluated.plan, evaluated.decisions)
    check_request_gates(evaluated)
    env = Environment.open(settings, actor=actor)
    try:
        if progress is None:
            return execute(env, evaluated.loaded, evaluated.plan, evaluated.decisions)
        with progress(len(evaluated.plan.partitions)) as advance:
            return execute(env, evaluated.loaded, evaluated.plan, evaluated.decisions, progress=advance)
    finally:
        env.close()


def execute_request(
    settings: Settings,
    raw: bytes | ValidatedRequest,
    base_dir: Path | None = None,
    *,
    confine_to: SourcesDirectory | None = None,
    actor: str | None = None,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Load, evaluate, gate and execute a request (`pcbo execute`, `POST /v1/execute`)."""
    with evaluated_request(raw, base_dir, confine_to, settings) as evaluated:
        return execute_evaluated(settings, evaluated, actor=actor, progress=progress)
