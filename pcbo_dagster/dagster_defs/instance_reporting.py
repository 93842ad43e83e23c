"""What the lake holds now, reported to a Dagster instance after a change made outside an asset run.

A CLI rollback, `pcbo verify --repair`, a `pcbo execute` or `pcbo rollout ...`, or a Dagster op that
rolls back or repairs, changes partitions without materializing the asset: the UI would go on showing
the old state. The engine announces each such change (`engine/lake_changes.py`); the listener here
reports the partitions' state *as the lake and the audit chain hold it now* to the instance:

- a partition whose commit point is the chain's current version gets a runless `AssetMaterialization`
  whose metadata is read from its committed manifest (the same entries a materialization records,
  `status` saying what happened: `rolled_back`, `repaired`, `committed`), so its latest
  materialization is the lake's;
- a partition with no version left (a rollback of its only version) must show as not materialized.
  Dagster's SQL event log cannot wipe single partitions (`wipe_asset_partitions` is not implemented
  for it in 1.13), so the asset is wiped (its run logs are kept; its materializations and check results
  are hidden) and every partition the lake still commits, agreeing with its chain, is reported again;
- a partition whose lake disagrees with its chain is not reported: that is a finding, and the
  `lake_drift` sensor launches its checks, which fail and turn it red. So is every partition of a
  chain that does not verify as the `audit_chain` check reads it (the backup against the catalog's
  head): a history written to the backup alone vouches for nothing.

`pcbo` installs this listener when a Dagster instance is configured: `DAGSTER_HOME` is set (and
`PCBO_DAGSTER_REPORTING` is not `off`) and Dagster is installed. The datasets config is the one the
code location loads (`PCBO_DATASETS_CONFIG`); a dataset it does not declare is not an asset and is not
reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg

from pcbo_dagster.datasets.config import DatasetConfig, DatasetsConfig, load_datasets_config_from_env
from pcbo_dagster.engine import lake_changes
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.partition_checks import committed_keys, read_distrusted_chain
from pcbo_dagster.engine.partition_reading import read_commit_point
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.rollout.environments import staging_settings

#: Turns the CLI's reporting off when set to `off` (DAGSTER_HOME set for another purpose).
REPORTING_ENV = "PCBO_DAGSTER_REPORTING"
#: The tag of a materialization reported from outside a run (who reported it).
REPORTED_BY_TAG = "pcbo/reported_by"


@dataclass(frozen=True)
class AssetTarget:
    """The Dagster asset a dataset's lake (production or a rollout's staging) is."""

    key: dg.AssetKey
    dataset: DatasetConfig


def asset_for_environment(
    config: DatasetsConfig, env: Environment, dataset: str, version_label: str
) -> AssetTarget | None:
    """The asset of `dataset`/`version_label` whose lake `env` is, or None (not a declared asset)."""
    for candidate in config.datasets:
        if candidate.name != dataset or candidate.versionLabel != version_label:
            continue
        if candidate.rollout is None:
            return AssetTarget(dg.AssetKey([candidate.asset_name]), candidate)
        staging = staging_settings(Settings.resolve(), config.staging_lake_url(candidate), checked=False)
        staging_lake = staging.lake_url
        stage = (
            "staging"
            if env.settings.lake_url == staging_lake or env.settings.home.name == "staging"
            else "production"
        )
        return AssetTarget(dg.AssetKey([stage, candidate.asset_name]), candidate)
    return None


def lake_state(env: Environment, dataset: str, version_label: str, keys: list[str]) -> dict[str, Any]:
    """Per key: `("present", manifest, checksum, event)` when its commit point is the chain's current
    version, `("absent",)` when the chain says none is current and the lake has none, else
    `("disagrees",)`. The chain is the one the `audit_chain` check reads (the backup, verified against
    the catalog's head, its stored log and checkpoints and, with the operator's key, every event the key
    should have signed; before 2026-12-08 the hashes alone): a chain with findings vouches for nothing,
    every key disagrees."""
    chain = read_distrusted_chain(env, dataset, version_label)
    state = chain.replayed
    out: dict[str, Any] = {}
    for key in keys:
        if chain.findings:
            out[key] = ("disagrees",)
            continue
        reading = read_commit_point(env.lake, dataset, version_label, key)
        history = state.get(key)
        current = history.current_version if history is not None else None
        if reading.manifest is None and current is None:
            out[key] = ("absent",)
        elif current is not None and reading.manifest_checksum == current.manifest_checksum:
            out[key] = ("present", reading.manifest, reading.manifest_checksum, current.event)
        else:
            out[key] = ("disagrees",)
    return out


def lake_metadata(
    env: Environment, target: AssetTarget, manifest: dict[str, Any], checksum: str, event: Any, status: str
) -> dict[str, Any]:
    """A materialization's metadata read from the lake (the entries an asset run records)."""
    from pcbo_dagster.dagster_defs.backfill.steps import partition_metadata

    part = manifest["partition"]
    key = part["key"]
    outcome = {
        "key": key,
        "start": part["start"],
        "end": part["end"],
        "status": status,
        "version": manifest["partitionVersion"],
        "recordCount": manifest["recordCount"],
        "merkleRoot": manifest["merkleRoot"],
        "eventHash": event["chain"]["event_hash"],
        "manifest": env.lake.uri(f"{manifest['dataset']}/{manifest['versionLabel']}/{key}/_manifest.json"),
        "manifestChecksum": checksum,
        "files": [
            {"uri": env.lake.uri(f["path"]), "checksum": f["checksum"], "byteSize": f["byteSize"]}
            for f in manifest["files"]
        ],
    }
    document = {"decisionHash": manifest["decisionHash"], "runId": manifest["runId"]}
    return partition_metadata(target.dataset, outcome, manifest["counts"], document)


def report_partitions(
    instance: dg.DagsterInstance,
    target: AssetTarget,
    env: Environment,
    keys: list[str],
    status: str,
    by: str,
) -> dict[str, Any]:
    """Report `keys` of `target` as the lake holds them now (see the module doc)."""
    dataset = target.dataset
    states = lake_state(env, dataset.name, dataset.versionLabel, keys)
    absent = [k for k, s in states.items() if s[0] == "absent"]
    present = {k: s for k, s in states.items() if s[0] == "present"}
    wiped = False
    if absent and set(absent) & instance.get_materialized_partitions(target.key):
        # No single-partition wipe on SQL storage: wipe the asset, report every committed partition.
        instance.wipe_assets([target.key])
        wiped = True
        everything = committed_keys(env.lake, dataset.name, dataset.versionLabel)
        again = lake_state(env, dataset.name, dataset.versionLabel, everything)
        present = {k: s for k, s in again.items() if s[0] == "present"} | present
    description = f"{status} outside a Dagster run by {by}"
    for key, (_, manifest, checksum, event) in sorted(present.items()):
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=target.key,
                partition=key,
                description=description
                if key in states
                else f"reported again after the asset was wiped ({description})",
                metadata={
                    **lake_metadata(
                        env, target, manifest, checksum, event, status if key in states else "committed"
                    ),
                    "reported_by": dg.MetadataValue.text(by),
                },
                tags={REPORTED_BY_TAG: _tag_value(by)},
            )
        )
    return {
        "asset": target.key.to_user_string(),
        "reported": sorted(present),
        "absent": absent,
        "disagrees": sorted(k for k, s in states.items() if s[0] == "disagrees"),
        "wiped": wiped,
    }


def _tag_value(text: str) -> str:
    """A Dagster tag value (at most 63 characters of `[A-Za-z0-9_.-]`)."""
    cleaned = "".join(c if c.isalnum() or c in "_.-" else "_" for c in text)
    return cleaned[:63] or "pcbo"


def listener_for(instance: dg.DagsterInstance, config: DatasetsConfig) -> lake_changes.Listener:
    """The engine's lake-change listener that reports to `instance`."""

    def listener(env: Environment, change: lake_changes.LakeChange) -> None:
        target = asset_for_environment(config, env, change.dataset, change.version_label)
        if target is not None:
            report_partitions(instance, target, env, list(change.keys), change.action, change.by)

    return listener


@contextmanager
def reporting_to(instance: dg.DagsterInstance, config: DatasetsConfig) -> Iterator[None]:
    """Report every lake change of the block to `instance`."""
    with lake_changes.listening(listener_for(instance, config)):
        yield


@contextmanager
def cli_reporting(command: str) -> Iterator[None]:
    """The `pcbo` CLI's reporting: to the instance of `DAGSTER_HOME` when set (and not turned off)."""
    if not os.environ.get("DAGSTER_HOME") or os.environ.get(REPORTING_ENV, "").lower() == "off":
        yield
        return
    try:
        config = load_datasets_config_from_env()
        instance = dg.DagsterInstance.get()
    except Exception as exc:  # noqa: BLE001 - reporting must not stop the command
        print(f"pcbo: not reporting to the Dagster instance: {type(exc).__name__}: {exc}", file=_stderr())
        yield
        return
    try:
        with reporting_to(instance, config), lake_changes.acting_as(command):
            yield
    finally:
        instance.dispose()


def _stderr() -> Any:
    import sys

    return sys.stderr
