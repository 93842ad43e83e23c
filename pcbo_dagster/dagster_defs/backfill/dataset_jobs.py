"""Per dataset, two jobs launched from the UI over a partition selection: `<asset>_dry_run` and
`<asset>_rollback`.

- `<asset>_dry_run` (partitioned like the asset; pick partitions or a range in the launchpad, or
  launch a backfill of it): evaluates the partitions exactly as the asset's policy gate does, writes
  nothing to the lake, and writes the decisions as a report under
  `$PCBO_HOME/reports/dry-runs/<dataset>/<run id>.{md,json}` (the `.json` is `pcbo dry-run`'s
  document: every id added or omitted, with its reasons). The step's metadata shows the decision hash
  and a table of counts by reason per partition. An approver pins what they reviewed by launching the
  asset over the same partitions with the policy gate's config
  `expected_decision_hash: <the hash>`: the run is blocked, nothing written, if the decisions are
  not those any more. A rollout dataset gets this job too (over its production partitions): there the
  pin is the approval, `pcbo approve <rollout> --decision-hash <the hash>`, refused when the rollout
  staged other decisions (its `rollout_rollback` job rolls back either stage).
- `<asset>_rollback` (partitioned the same way, or by run): undoes each selected partition's current
  version (`pcbo rollback --partition K` for each), or with `run_id` every version a run wrote (the
  Dagster run id of a materialization, or the engine's `dagster-<run id>`). `version` names the
  version to undo on purpose (`--version N`). Idempotent, audited by the engine's rollback events.
  The partitions' new state is reported to the instance as `pcbo rollback` reports it
  (`instance_reporting.py`): the UI shows the version the lake holds now, or the partition as not
  materialized.
"""

import json
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from pcbo_dagster.core.decisions import REASONS
from pcbo_dagster.core.json_documents import streamed_text
from pcbo_dagster.dagster_defs.backfill.steps import engine_errors, engine_requests, evaluate_request
from pcbo_dagster.dagster_defs.partitions import run_partition_keys
from pcbo_dagster.dagster_defs.resources import PcboEngineResource
from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig
from pcbo_dagster.engine import lake_changes
from pcbo_dagster.engine.backfill_commands import refuse_table_request
from pcbo_dagster.engine.rollback import rollback
from pcbo_dagster.io.atomic_files import replacing
from pcbo_dagster.rollout.reports import markdown_table, reports_dir

#: Where the dry-run reports go, under the reports directory.
DRY_RUNS = "dry-runs"


def dry_run_job_name(dataset: DatasetConfig) -> str:
    return f"{dataset.asset_name}_dry_run"


def rollback_job_name(dataset: DatasetConfig) -> str:
    return f"{dataset.asset_name}_rollback"


def _pin_config(dataset: DatasetConfig, decision_hash: str) -> str:
    """How to hold a write to `decision_hash`: the asset's policy gate config (launchpad), or for a
    rollout dataset the approval (which is refused for any other staged decisions)."""
    if dataset.rollout is not None:
        return f"pcbo approve <rollout> --by WHO --reason WHY --decision-hash {decision_hash}"
    op = f"{dataset.asset_name}__policy_gate"
    config = {
        "ops": {dataset.asset_name: {"ops": {op: {"config": {"expected_decision_hash": decision_hash}}}}}
    }
    return json.dumps(config)  # JSON is YAML: paste it into the launchpad


def _markdown(dataset: DatasetConfig, run_id: str, requests: list[dict[str, Any]]) -> str:
    lines = [f"# Dry run of {dataset.name}/{dataset.versionLabel} (Dagster run {run_id})", ""]
    if dataset.rollout is None:
        lines.append(
            "Nothing was written. To materialize exactly these decisions, launch the asset over the same"
        )
        lines.append("partitions with the policy gate pinned to the decision hash (the run is blocked if the")
        lines.append("decisions changed):")
        where = "launchpad"
    else:
        lines.append("Nothing was written. A rollout of exactly these partitions stages these decisions;")
        lines.append("approve it naming the decision hash (the approval is refused if the rollout staged")
        lines.append("other decisions, and a stale approval opens no promotion):")
        where = "approve with"
    lines.append("")
    for request in requests:
        lines.append(
            f"- {request['keys'][0]}..{request['keys'][-1]}: decision hash `{request['decisionHash']}`"
        )
        lines.append(
            f"  (plan `{request['planHash']}`); {where}: `{_pin_config(dataset, request['decisionHash'])}`"
        )
    lines.append("")
    header = ["partition", "source", "add", "omit", *REASONS]
    rows = [
        [p["key"], p["source"], p["add"], p["omit"], *(p["byReason"].get(r, 0) for r in REASONS)]
        for request in requests
        for p in request["partitions"]
    ]
    lines.append(markdown_table(header, rows))
    unplaced = {r: n for request in requests for r, n in request["unplaced"].items() if n}
    lines.append("")
    lines.append(f"Records outside these partitions: {json.dumps(unplaced) if unplaced else 'none'}")
    return "\n".join(lines) + "\n"


def build_dataset_jobs(
    config: DatasetsConfig, dataset: DatasetConfig, asset: dg.AssetsDefinition, *, with_rollback: bool = True
) -> list[dg.JobDefinition]:
    """The dry-run and rollback jobs of a dataset's asset (a rollout dataset's production asset: its
    dry run only; `rollout_rollback` rolls back its stages)."""
    partitions_def = asset.partitions_def
    lake = config.lake_url(dataset)

    @dg.op(name=f"{dataset.asset_name}__dry_run", tags={"pcbo/step": "dry_run"})
    def dry_run(context: dg.OpExecutionContext, pcbo: PcboEngineResource) -> dict:
        from pcbo_dagster.engine.sql_apply import deployment_chain_reader

        source_uri = pcbo.sources.resolve(dataset.source.uri, config.sources_dir)
        keys = run_partition_keys(context, dataset.name)
        run_id = context.run.run_id
        settings = pcbo.settings(lake)
        directory = reports_dir(settings) / DRY_RUNS / dataset.name
        # The deployment's chains, read and verified (nothing written): the table an earlier run declared.
        chain = deployment_chain_reader(settings)
        summary: list[dict[str, Any]] = []
        with engine_errors(source_uri):
            requests = engine_requests(
                dataset, partitions_def, source_uri, keys, run_id, {"orchestrator": "dagster", "dryRun": True}
            )
            evaluated = []
            for _, request, group_keys in requests:  # what the materialization would refuse, first
                loaded, plan, decisions = evaluate_request(context, request, group_keys)
                refuse_table_request(loaded, plan, decisions, chain, settings)
                evaluated.append((group_keys, plan, decisions))
            directory.mkdir(parents=True, exist_ok=True)
            for index, (group_keys, plan, decisions) in enumerate(evaluated):
                stem = run_id if len(requests) == 1 else f"{run_id}.{index}"
                with replacing(directory / f"{stem}.json", prefix=f".{stem}.") as raw:
                    for piece in streamed_text(decisions.to_json(lazy=True)):
                        raw.write(piece.encode("utf-8"))
                by_reason = decisions.totals["byReason"]
                summary.append(
                    {
                        "keys": group_keys,
                        "planHash": plan.plan_hash,
                        "decisionHash": decisions.decision_hash,
                        "report": str(directory / f"{stem}.json"),
                        "partitions": [{"key": pd.partition.key, **pd.counts} for pd in decisions.partitions],
                        "unplaced": {r: n for r, n in by_reason.items() if r not in REASONS},
                    }
                )
        markdown = _markdown(dataset, run_id, summary)
        md_path = directory / f"{run_id}.md"
        with replacing(md_path, prefix=f".{run_id}.md.") as raw:
            raw.write(markdown.encode("utf-8"))
        hashes = [s["decisionHash"] for s in summary]
        context.log.info(
            f"dry run of {len(keys)} partition(s): decision hash {', '.join(hashes)}; report {md_path} "
            f"(pin it: {_pin_config(dataset, hashes[0])})"
        )
        rows = [p for s in summary for p in s["partitions"]]
        context.add_output_metadata(
            {
                "decision_hash": dg.MetadataValue.text(", ".join(hashes)),
                "plan_hash": dg.MetadataValue.text(", ".join(s["planHash"] for s in summary)),
                "pin": dg.MetadataValue.text(_pin_config(dataset, hashes[0])),
                "report": dg.MetadataValue.path(str(md_path)),
                "decisions": dg.MetadataValue.path(summary[0]["report"]),
                "partitions": dg.MetadataValue.int(len(rows)),
                "add": dg.MetadataValue.int(sum(p["add"] for p in rows)),
                "omit": dg.MetadataValue.int(sum(p["omit"] for p in rows)),
                "counts_by_reason": dg.MetadataValue.md(markdown.split("\n\n", 3)[-1][:60000]),
            }
        )
        return {"decisionHashes": hashes, "report": str(md_path)}

    class RollbackConfig(dg.Config):
        run_id: str = Field(
            default="",
            description="Roll back every version this run wrote (a Dagster run id, or the engine's "
            "dagster-<run id>); empty: the partitions the job was launched for",
        )
        version: int | None = Field(default=None, description="The version to undo (one partition only)")
        reason: str = Field(default="requested from the Dagster UI", description="Why (on the audit chain)")

    @dg.op(name=f"{dataset.asset_name}__rollback", tags={"pcbo/step": "rollback"})
    def rollback_op(context: dg.OpExecutionContext, config: RollbackConfig, pcbo: PcboEngineResource) -> dict:
        from pcbo_dagster.dagster_defs.instance_reporting import reporting_to

        run_id = config.run_id.strip()
        if run_id and not run_id.startswith("dagster-") and context.instance.get_run_by_id(run_id):
            run_id = f"dagster-{run_id}"
        keys = [] if run_id else run_partition_keys(context, dataset.name)
        if not run_id and not keys:
            raise dg.Failure(
                description="select partitions to roll back, or give a run_id", allow_retries=False
            )
        by = f"Dagster run {context.run.run_id} ({dataset.asset_name}_rollback)"
        with (
            engine_errors(),
            pcbo.environment(lake) as env,
            reporting_to(context.instance, config_of_location),
            lake_changes.acting_as(by),
        ):
            if run_id:
                result = rollback(
                    env, dataset.name, dataset.versionLabel, run_id=run_id, reason=config.reason
                )
            elif config.version is not None:
                if len(keys) != 1:
                    raise dg.Failure(
                        description="a version is rolled back for one partition", allow_retries=False
                    )
                result = rollback(
                    env, dataset.name, dataset.versionLabel, partition_key=keys[0], version=config.version,
                    reason=config.reason,
                )  # fmt: skip
            else:
                result = rollback(
                    env, dataset.name, dataset.versionLabel, partition_keys=keys, reason=config.reason
                )
        done = [p["key"] for p in result["partitions"] if p["status"] == "rolled_back"]
        noop = [p for p in result["partitions"] if p["status"] != "rolled_back"]
        unchanged = "; ".join(f"{p['key']}: {p.get('detail')}" for p in noop[:5])
        context.log.info(
            f"rollback of {dataset.name}/{dataset.versionLabel}: {len(done)} partition(s) rolled back, "
            f"{len(noop)} unchanged ({unchanged or 'none'})"
        )
        context.add_output_metadata(
            {
                "rolled_back": dg.MetadataValue.int(len(done)),
                "unchanged": dg.MetadataValue.int(len(noop)),
                "partitions": dg.MetadataValue.json(result["partitions"][:200]),
            }
        )
        return result

    config_of_location = config

    @dg.job(
        name=dry_run_job_name(dataset),
        partitions_def=partitions_def,
        description=f"Dry run of {dataset.name} over a partition selection: decisions and counts by reason "
        "per partition, the decision hash to pin; nothing written",
        tags={"pcbo/kind": "dry_run"},
    )
    def dry_run_job() -> None:
        dry_run()

    @dg.job(
        name=rollback_job_name(dataset),
        partitions_def=partitions_def,
        description=f"Roll back {dataset.name}: the selected partitions' current versions, or a run's "
        "(config run_id); audited, idempotent; the UI is updated",
        tags={"pcbo/kind": "rollback"},
    )
    def rollback_job() -> None:
        rollback_op()

    return [dry_run_job, rollback_job] if with_rollback else [dry_run_job]


def report_path(settings_home: Path, dataset: str, run_id: str) -> Path:
    """Where a dry-run job's markdown report is written."""
    return settings_home / "reports" / DRY_RUNS / dataset / f"{run_id}.md"
