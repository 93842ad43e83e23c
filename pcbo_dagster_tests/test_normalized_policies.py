"""`NormalizedPolicies`: the one normalisation of a request's or a dataset config's `policies`
(`from_policies`) and the reading of a manifest's (`from_json`), which the plan, the Dagster checks,
the soak and `verify` share."""

from __future__ import annotations

import pytest

from pcbo_dagster.core.instants import parse_instant
from pcbo_dagster.core.plan import NormalizedPolicies, build_plan
from pcbo_dagster.core.request_model import Policies, validate_request
from pcbo_dagster.datasets.config import parse_datasets_config

POLICIES = {
    "requireConsent": False,
    "allowedJurisdictions": [" us", "US", "ca\u2003", "ée", "fr"],
    "retentionCutoff": "2024-06-01T02:00:00.5+02:00",
    "onViolation": "block",
}


def test_policies_are_normalised_as_the_plan_hash_takes_them() -> None:
    policies = NormalizedPolicies.from_policies(Policies.model_validate(POLICIES))
    # trimmed (Unicode white space), upper-cased (Unicode too), unique, sorted
    assert policies.allowed_jurisdictions == ("CA", "FR", "US", "ÉE")
    assert policies.retention_cutoff_us == parse_instant("2024-06-01T00:00:00.5Z")
    assert (policies.require_consent, policies.on_violation) == (False, "block")
    assert policies.to_json() == {
        "requireConsent": False,
        "allowedJurisdictions": ["CA", "FR", "US", "ÉE"],
        "retentionCutoff": "2024-06-01T00:00:00.500000Z",
        "onViolation": "block",
    }


def test_defaults_and_an_empty_list() -> None:
    defaults = NormalizedPolicies.from_policies(Policies())
    assert defaults == NormalizedPolicies(True, None, None, "omit")
    nothing_allowed = NormalizedPolicies.from_policies(Policies(allowedJurisdictions=[]))
    assert nothing_allowed.allowed_jurisdictions == ()  # an empty list allows nothing


def test_a_request_and_a_dataset_config_with_the_same_policies_agree() -> None:
    request = validate_request(
        {
            "runId": "r1",
            "dataset": "events",
            "start": "2024-01-01T00:00:00Z",
            "end": "2024-01-01T01:00:00Z",
            "policies": POLICIES,
            "sourceRecords": [],
        }
    )
    config = parse_datasets_config(
        """
datasets:
  - name: events
    partitioning: {kind: time_window, start: "2024-01-01T00:00:00Z"}
    source: {uri: events.jsonl}
    policies:
      requireConsent: false
      allowedJurisdictions: [" us", US, "ca\\u2003", ée, fr]
      retentionCutoff: "2024-06-01T02:00:00.5+02:00"
      onViolation: block
"""
    )
    from_config = NormalizedPolicies.from_policies(config.datasets[0].policies)
    assert build_plan(request, []).policies == from_config


def test_a_manifests_policies_read_back_as_written() -> None:
    policies = NormalizedPolicies.from_policies(Policies.model_validate(POLICIES))
    assert NormalizedPolicies.from_json(policies.to_json()) == policies
    defaults = NormalizedPolicies.from_policies(Policies())
    assert NormalizedPolicies.from_json(defaults.to_json()) == defaults
    # Already normalised: taken as written, not normalised again (verify checks what was committed).
    written = {**policies.to_json(), "allowedJurisdictions": ["us"]}
    assert NormalizedPolicies.from_json(written).allowed_jurisdictions == ("us",)
    for field in ("requireConsent", "onViolation"):
        incomplete = {k: v for k, v in policies.to_json().items() if k != field}
        with pytest.raises(KeyError):
            NormalizedPolicies.from_json(incomplete)
