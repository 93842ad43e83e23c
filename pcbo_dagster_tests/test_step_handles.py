"""The handles the four steps of a dataset's asset pass each other (`handle_storage.py`): JSON in the
Dagster instance's database, which every host shares. A run re-executed from a later step reads the
parent run's handles; a handle altered in the instance is refused by the step that reads it."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

dg = pytest.importorskip("dagster")

from pcbo_dagster.dagster_defs import range_runs  # noqa: E402
from pcbo_dagster.dagster_defs.backfill.handle_storage import decode_handle, encode_handle  # noqa: E402
from pcbo_dagster.datasets.demo_data import example_sources_dir, generate_demo_data  # noqa: E402
from pcbo_dagster.engine.request_loading import evaluate, load_request  # noqa: E402

SPAN = ("20240101T000000Z", "20240101T030000Z")
TAGS = {"dagster/asset_partition_range_start": SPAN[0], "dagster/asset_partition_range_end": SPAN[1]}
GATE_STEP = "events.events__policy_gate"


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name in [n for n in os.environ if n.startswith("PCBO_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PCBO_HOME", str(tmp_path / "pcbo"))
    generate_demo_data(example_sources_dir())
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as inst:
        yield inst


def _reexecute_from_emission(instance: Any, parent_run_id: str) -> Any:
    repo = range_runs.ReconstructableRepository.for_module(range_runs.MODULE, "defs")
    return dg.execute_job(
        repo.get_reconstructable_job(range_runs.ASSET_JOB),
        instance,
        tags=TAGS,
        raise_on_error=False,
        reexecution_options=dg.ReexecutionOptions(
            parent_run_id=parent_run_id, step_selection=["events.events__parquet_emission*"]
        ),
    )


def _failures(result: Any) -> list[str]:
    return [e.event_specific_data.error.message for e in result.all_events if e.is_step_failure]


def test_a_run_re_executed_from_emission_reads_its_parents_gate(instance):
    """Re-execution from a later step (the UI's "re-execute from failure" or a step selection): the
    emission of the new run writes a handle holding the parent's gate; the next steps read it."""
    first = range_runs.launch("events", SPAN, instance, checks=False)
    assert first["success"] == "true"
    again = _reexecute_from_emission(instance, first["runId"])
    assert again.success, _failures(again)


def test_a_policy_gate_handle_altered_in_the_dagster_instance_is_refused(instance, tmp_path):
    """Someone who can write the Dagster instance's database replaces the policy gate's handle with a
    request of other policies (consent no longer required), its plan and decision hashes made to match:
    the step reading it rebuilds the requests from the run's tags and its own datasets config and
    refuses the handle, nothing written."""
    first = range_runs.launch("events", SPAN, instance, checks=False)
    assert first["success"] == "true"
    key = f"pcbo.step-handle/1/{first['runId']}/{GATE_STEP}/result"
    gate = decode_handle(instance.run_storage.get_cursor_values({key})[key])
    [handle] = gate.requests
    request = json.loads(handle.request_json)
    assert request["policies"]["requireConsent"] is True
    request["policies"]["requireConsent"] = False
    plan, decisions = evaluate(load_request(json.dumps(request).encode("utf-8")))
    assert decisions.decision_hash != handle.decision_hash  # the forged request decides otherwise
    forged = dataclasses.replace(
        handle,
        request_json=json.dumps(request),
        plan_hash=plan.plan_hash,
        decision_hash=decisions.decision_hash,
    )
    instance.run_storage.set_cursor_values(
        {key: encode_handle(dataclasses.replace(gate, requests=(forged,)))}
    )
    lake = tmp_path / "pcbo" / "lake"
    before = {p: p.read_bytes() for p in sorted(lake.rglob("*")) if p.is_file()}
    again = _reexecute_from_emission(instance, first["runId"])
    assert not again.success
    assert any("the policy gate's requests are not the ones this run" in m for m in _failures(again))
    assert {p: p.read_bytes() for p in sorted(lake.rglob("*")) if p.is_file()} == before


def test_a_step_on_a_host_with_another_lake_than_the_gates_is_refused(instance, tmp_path, monkeypatch):
    """A worker configured with another lake (or catalog, or audit store) than the host that ran the
    policy gate: before, its steps wrote the run's partitions into its own stores and the run
    succeeded, the shared stores never seeing them. The gate's handle names the stores it was
    evaluated for; a step on a host with others fails, nothing written."""
    first = range_runs.launch("events", SPAN, instance, checks=False)
    assert first["success"] == "true"
    other = tmp_path / "other-lake"
    monkeypatch.setenv("PCBO_LAKE_URL", str(other))
    again = _reexecute_from_emission(instance, first["runId"])
    assert not again.success
    assert any("are not the policy gate's" in m for m in _failures(again)), _failures(again)
    assert not other.exists() or not [p for p in other.rglob("*") if p.is_file()]
