"""`engine/partition_checks.py`, without Dagster: the check verdicts on a committed lake pass, and
each fails on what it is there to find (a flipped byte, a row the policies would not add, a commit
event missing, a gap in the keys)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcbo_dagster.core.plan import NormalizedPolicies
from pcbo_dagster.core.request_model import Policies
from pcbo_dagster.engine import partition_checks as checks
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.execute import execute
from pcbo_dagster.engine.request_loading import evaluate, load_request
from pcbo_dagster.engine.settings import Settings

KEYS = ["20240101T000000Z", "20240101T010000Z", "20240101T020000Z"]
REQUEST = {
    "runId": "checks-run",
    "dataset": "events",
    "start": "2024-01-01T00:00:00Z",
    "end": "2024-01-01T03:00:00Z",
    "policies": {"requireConsent": True},
    "sourceRecords": [
        {
            "id": f"r{h}-{i}",
            "occurredAt": f"2024-01-01T0{h}:1{i}:00Z",
            "consentGranted": True,
            "jurisdiction": j,
        }
        for h in range(3)
        for i, j in enumerate(["US", "CA", "FR"])
    ],
}
CONSENT_ONLY = NormalizedPolicies.from_policies(Policies(requireConsent=True))


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Environment]:
    environment = Environment.open(Settings.resolve(home=str(tmp_path / "home"), env={}))
    loaded = load_request(json.dumps(REQUEST).encode())
    plan, decisions = evaluate(loaded)
    assert execute(environment, loaded, plan, decisions)["status"] == "committed"
    yield environment
    environment.close()


def test_a_committed_lake_passes_every_verdict(env: Environment) -> None:
    chain = checks.read_chain(env, "events", "v1")
    assert checks.committed_keys(env.lake, "events", "v1") == KEYS
    for key in KEYS:
        part = checks.read_committed(env.lake, "events", "v1", key)
        reconciled = checks.reconciliation(part)
        assert reconciled.passed and reconciled.details["rows_read"] == 3, reconciled
        assert reconciled.details["merkle_root"] == reconciled.details["merkle_root_recomputed"]
        compliant = checks.compliance(part, CONSENT_ONLY, [])
        assert compliant.passed and compliant.details["committed_under_configured_policies"] is True
        chained = checks.chain_verdict(checks.read_manifest_only(env.lake, "events", "v1", key), chain)
        assert chained.passed and chained.details["chain_length"] == 4  # the commit intent and 3 commits
    covered = checks.coverage(
        chain, checks.committed_keys(env.lake, "events", "v1"), KEYS + ["20240101T030000Z"]
    )
    assert covered.passed and covered.summary == f"no gaps up to {KEYS[-1]}; 1 partition(s) after it"
    # Plain JSON values only: what Dagster wraps, and what anyone else can store.
    json.dumps([covered.details, reconciled.details, compliant.details, chained.details])


def test_each_verdict_fails_on_what_it_finds(env: Environment) -> None:
    part = checks.read_committed(env.lake, "events", "v1", KEYS[1])
    # Rows the policies configured now would not add, and an existing target id.
    only_us = NormalizedPolicies.from_policies(Policies(allowedJurisdictions=["us"]))
    compliant = checks.compliance(part, only_us, ["r1-0"])
    assert not compliant.passed and compliant.details["committed_under_configured_policies"] is False
    assert compliant.details["violations"] == [
        {"id": "r1-0", "reasons": ["ALREADY_PRESENT"]},
        {"id": "r1-1", "reasons": ["JURISDICTION_NOT_ALLOWED"]},
        {"id": "r1-2", "reasons": ["JURISDICTION_NOT_ALLOWED"]},
    ]
    assert checks.policy_violations(part.tables, only_us, []) == compliant.details["violations"][1:]

    # A flipped byte in a data file: reconciliation names the file by its URI; compliance cannot read it.
    path = part.manifest["files"][0]["path"]  # type: ignore[index]
    data = bytearray(env.lake.read(path))
    data[len(data) // 2] ^= 0x01
    env.lake.write(path, bytes(data))
    part = checks.read_committed(env.lake, "events", "v1", KEYS[1])
    reconciled = checks.reconciliation(part)
    assert not reconciled.passed
    assert any(env.lake.uri(path) in f and "SHA-256" in f for f in reconciled.details["findings"])
    assert checks.compliance(part, CONSENT_ONLY, []).details["unreadable"] == [env.lake.uri(path)]

    # A partition with no commit point, and a gap before the last committed one.
    env.lake.delete(f"events/v1/{KEYS[0]}/_manifest.json")
    missing = checks.reconciliation(checks.read_committed(env.lake, "events", "v1", KEYS[0]))
    assert not missing.passed and "no committed manifest" in missing.details["findings"][0]
    chain = checks.read_chain(env, "events", "v1")
    covered = checks.coverage(chain, checks.committed_keys(env.lake, "events", "v1"), KEYS)
    assert not covered.passed and covered.details["missing_from_lake"] == [KEYS[0]]
    assert covered.summary == "1 committed partition(s) missing from the lake"
    # The chain alone says what is committed: one it never committed is a gap, whatever the lake holds.
    del chain.replayed.partitions[KEYS[0]]
    covered = checks.coverage(chain, KEYS, KEYS)
    assert not covered.passed and covered.details["first_gaps"] == [KEYS[0]]
    assert covered.details["uncommitted_in_lake"] == [KEYS[0]]
    assert (
        covered.summary
        == f"1 gap(s) up to {KEYS[-1]}; 1 commit point(s) in the lake the chain never committed"
    )

    # A committed manifest the chain does not name as current (here: a chain that never named it).
    chain = checks.read_chain(env, "events", "v1")
    del chain.replayed.partitions[KEYS[2]]
    chained = checks.chain_verdict(checks.read_manifest_only(env.lake, "events", "v1", KEYS[2]), chain)
    assert not chained.passed and "not the version the audit chain says" in chained.details["findings"][0]
