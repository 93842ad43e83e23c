"""Record decisions (CONTRACT section 2) through `load_request` + `evaluate`, in-process.

One test per reason and per boundary; sorting, partition keys, counts; input order; and the plan and
decision hashes recomputed here from the contract's formula with `rfc8785` + `hashlib` (the project's
own hash functions are deliberately not used).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from pcbo_dagster.engine.request_loading import evaluate, load_request

START = "2024-01-01T00:00:00Z"
END = "2024-01-01T03:00:00Z"  # three one-hour partitions
IN_WINDOW = "2024-01-01T00:10:00Z"
PARTITION_REASONS = [
    "CONSENT_MISSING",
    "JURISDICTION_NOT_ALLOWED",
    "RETENTION_EXPIRED",
    "ALREADY_PRESENT",
    "DUPLICATE_ID",
]
ALL_REASONS = ["INVALID_RECORD", "OUT_OF_WINDOW", *PARTITION_REASONS]
_MISSING = object()


# ----------------------------------------------------------------------------------------------------------
# helpers


def rec(rid: Any = "a", at: Any = IN_WINDOW, **fields: Any) -> dict[str, Any]:
    """A record that is added under the default policies unless told otherwise.

    Pass a field as `_MISSING` to leave it out.
    """
    record: dict[str, Any] = {"id": rid, "occurredAt": at, "consentGranted": True}
    record.update(fields)
    return {k: v for k, v in record.items() if v is not _MISSING}


def make_request(records: list[Any], policies: Any = _MISSING, **overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "runId": "run-1",
        "dataset": "events",
        "start": START,
        "end": END,
        "chunkSeconds": 3600,
        "sourceRecords": records,
    }
    if policies is not _MISSING:
        request["policies"] = policies
    request.update(overrides)
    return request


def dry_run(request: dict[str, Any]) -> dict[str, Any]:
    loaded = load_request(json.dumps(request).encode("utf-8"))
    _, decisions = evaluate(loaded)
    document = decisions.to_json()
    # Whatever the engine returns must survive a JSON round trip unchanged (it is printed as JSON).
    assert json.loads(json.dumps(document)) == document
    return document


def decide(records: list[Any], policies: Any = _MISSING, **overrides: Any) -> dict[str, Any]:
    return dry_run(make_request(records, policies, **overrides))


def placements(document: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(partition key, id, reasons) for every placed record; reasons [] means added."""
    out: list[tuple[str, str, list[str]]] = []
    for part in document["partitions"]:
        out.extend((part["key"], i, []) for i in part["add"])
        out.extend((part["key"], o["id"], o["reasons"]) for o in part["omit"])
    return out


def only_placement(document: dict[str, Any]) -> tuple[str, str, list[str]]:
    placed = placements(document)
    assert len(placed) == 1, placed
    assert document["unplaced"] == []
    return placed[0]


def only_placement_or_fail(document: dict[str, Any]) -> tuple[str, str, list[str]]:
    placed = placements(document)
    assert len(placed) == 1, placed
    return placed[0]


def only_unplaced(document: dict[str, Any]) -> dict[str, Any]:
    assert placements(document) == []
    assert len(document["unplaced"]) == 1, document["unplaced"]
    return document["unplaced"][0]


def reasons_of(records: list[Any], policies: Any = _MISSING, **overrides: Any) -> list[str]:
    """The reasons of the single placed record ([] when added)."""
    return only_placement(decide(records, policies, **overrides))[2]


def utc_text(instant: str) -> str:
    """Independent normalisation of an instant to `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`."""
    parsed = datetime.fromisoformat(instant).astimezone(UTC)
    text = parsed.strftime("%Y-%m-%dT%H:%M:%S")
    if parsed.microsecond:
        text += f".{parsed.microsecond:06d}"
    return text + "Z"


def sha256_jcs(value: Any) -> str:
    return hashlib.sha256(rfc8785.dumps(value)).hexdigest()


def expected_plan_hash(request: dict[str, Any]) -> str:
    """planHash, written out from CONTRACT section 3."""
    policies = request.get("policies", {})
    allowed = policies.get("allowedJurisdictions")
    cutoff = policies.get("retentionCutoff")
    document = {
        "v": "pcbo.plan/1",
        "dataset": request["dataset"],
        "versionLabel": request.get("versionLabel", "v1"),
        "start": utc_text(request["start"]),
        "end": utc_text(request["end"]),
        "chunkSeconds": request.get("chunkSeconds", 3600),
        "policies": {
            "requireConsent": policies.get("requireConsent", True),
            "allowedJurisdictions": None if allowed is None else sorted({a.strip().upper() for a in allowed}),
            "retentionCutoff": None if cutoff is None else utc_text(cutoff),
            "onViolation": policies.get("onViolation", "omit"),
        },
        "records": sorted(sha256_jcs(r) for r in request["sourceRecords"]),
        "existingTargetIds": sorted(set(request.get("existingTargetIds", []))),
    }
    return "sha256:" + sha256_jcs(document)


def expected_decision_hash(plan_hash: str, document: dict[str, Any]) -> str:
    """decisionHash, written out from CONTRACT section 3, over the dry-run document's decisions."""
    decisions = {
        "v": "pcbo.decisions/1",
        "planHash": plan_hash,
        "partitions": [
            {
                "key": p["key"],
                "add": p["add"],
                "omit": [{"id": o["id"], "reasons": o["reasons"]} for o in p["omit"]],
            }
            for p in document["partitions"]
        ],
        "unplaced": [
            {"index": u["index"], "id": u["id"], "reasons": u["reasons"]} for u in document["unplaced"]
        ],
    }
    return "sha256:" + sha256_jcs(decisions)


# ----------------------------------------------------------------------------------------------------------
# INVALID_RECORD


@pytest.mark.parametrize(
    ("record", "expected_id", "detail_words"),
    [
        pytest.param(5, None, ["not a JSON object"], id="integer"),
        pytest.param("rec-1", None, ["not a JSON object"], id="string"),
        pytest.param(None, None, ["not a JSON object"], id="null"),
        pytest.param(["a", IN_WINDOW], None, ["not a JSON object"], id="array"),
        pytest.param(rec(rid=_MISSING), None, ["id", "missing"], id="id-missing"),
        pytest.param(rec(rid=None), None, ["id", "missing"], id="id-null"),
        pytest.param(rec(rid=""), "", ["id", "empty"], id="id-empty"),
        pytest.param(rec(rid=7), None, ["id", "not a string"], id="id-integer"),
        pytest.param(rec(rid=["a"]), None, ["id", "not a string"], id="id-array"),
        pytest.param(rec(at=_MISSING), "a", ["occurredAt", "missing"], id="occurredAt-missing"),
        pytest.param(rec(at=None), "a", ["occurredAt", "missing"], id="occurredAt-null"),
        pytest.param(rec(at="yesterday"), "a", ["occurredAt"], id="occurredAt-unparseable"),
        pytest.param(rec(at="2024-01-01T00:10:00"), "a", ["occurredAt", "offset"], id="occurredAt-no-offset"),
        pytest.param(rec(at="2024-01-01T00:10Z"), "a", ["occurredAt", "seconds"], id="occurredAt-no-seconds"),
        pytest.param(rec(at="2024-01-01t00:10:00z"), "a", ["occurredAt"], id="occurredAt-lowercase"),
        pytest.param(rec(at="2024-01-01 00:10:00Z"), "a", ["occurredAt"], id="occurredAt-space"),
        pytest.param(rec(at="2024-02-30T00:10:00Z"), "a", ["occurredAt"], id="occurredAt-no-such-day"),
        pytest.param(rec(at="2024-01-01T24:00:00Z"), "a", ["occurredAt"], id="occurredAt-hour-24"),
        pytest.param(rec(at="2024-01-01T00:10:00+0100"), "a", ["occurredAt"], id="occurredAt-basic-offset"),
        pytest.param(rec(at=1704067800), "a", ["occurredAt", "not a string"], id="occurredAt-number"),
        pytest.param(rec(retentionExpiresAt="soon"), "a", ["retentionExpiresAt"], id="retention-unparseable"),
        pytest.param(
            rec(retentionExpiresAt="2025-01-01T00:00:00"),
            "a",
            ["retentionExpiresAt"],
            id="retention-no-offset",
        ),
        pytest.param(rec(retentionExpiresAt=1735689600), "a", ["retentionExpiresAt"], id="retention-number"),
        pytest.param(rec(retentionExpiresAt=False), "a", ["retentionExpiresAt"], id="retention-false"),
    ],
)
def test_invalid_record(record: Any, expected_id: str | None, detail_words: list[str]) -> None:
    document = decide([record], policies={"retentionCutoff": "2020-01-01T00:00:00Z"})
    entry = only_unplaced(document)
    assert entry["index"] == 0
    assert entry["id"] == expected_id
    assert entry["reasons"] == ["INVALID_RECORD"]
    assert isinstance(entry["detail"], str) and entry["detail"]
    for word in detail_words:
        assert word in entry["detail"], entry["detail"]
    # Each case has exactly one problem: the detail names it and nothing else.
    assert ";" not in entry["detail"], entry["detail"]
    assert "None" not in entry["detail"], entry["detail"]
    assert document["totals"]["byReason"]["INVALID_RECORD"] == 1
    assert document["totals"]["unplaced"] == 1
    assert document["totals"]["placed"] == 0


def test_invalid_record_detail_lists_every_problem() -> None:
    entry = only_unplaced(decide([{"id": 3, "occurredAt": "nope", "retentionExpiresAt": "never"}]))
    assert entry["reasons"] == ["INVALID_RECORD"]
    problems = entry["detail"].split("; ")
    assert len(problems) == 3, entry["detail"]
    for problem, word in zip(problems, ("id", "occurredAt", "retentionExpiresAt"), strict=True):
        assert problem.startswith(word), entry["detail"]


def test_invalid_wins_over_out_of_window_and_policies() -> None:
    # Out of window AND a bad retentionExpiresAt: the record is invalid (one reason only).
    entry = only_unplaced(
        decide([rec(at="2030-01-01T00:00:00Z", retentionExpiresAt="bad", consentGranted=False)])
    )
    assert entry["reasons"] == ["INVALID_RECORD"]


def test_retention_null_is_not_invalid() -> None:
    # No retention cutoff: a null retentionExpiresAt is simply added.
    assert reasons_of([rec(retentionExpiresAt=None)]) == []
    # With a cutoff it is placed (not unplaced) and fails closed.
    assert reasons_of([rec(retentionExpiresAt=None)], {"retentionCutoff": "2020-01-01T00:00:00Z"}) == [
        "RETENTION_EXPIRED"
    ]


# ----------------------------------------------------------------------------------------------------------
# OUT_OF_WINDOW and the window's boundaries


@pytest.mark.parametrize(
    ("occurred_at", "placed_in"),
    [
        pytest.param("2023-12-31T23:59:59.999999Z", None, id="start-minus-1us"),
        pytest.param("2023-06-01T00:00:00Z", None, id="well-before"),
        pytest.param("2024-01-01T00:00:00Z", "20240101T000000Z", id="equal-start"),
        pytest.param("2024-01-01T00:59:59.999999Z", "20240101T000000Z", id="partition-end-minus-1us"),
        pytest.param("2024-01-01T01:00:00Z", "20240101T010000Z", id="partition-boundary"),
        pytest.param("2024-01-01T02:59:59.999999Z", "20240101T020000Z", id="end-minus-1us"),
        pytest.param("2024-01-01T03:00:00Z", None, id="equal-end"),
        pytest.param("2024-01-01T03:00:00.000001Z", None, id="end-plus-1us"),
        pytest.param("9999-12-31T23:59:59Z", None, id="year-9999"),
        pytest.param("0001-01-01T00:00:00Z", None, id="year-0001"),
    ],
)
def test_window_boundaries(occurred_at: str, placed_in: str | None) -> None:
    document = decide([rec("a", occurred_at)])
    if placed_in is None:
        entry = only_unplaced(document)
        assert entry == {
            "index": 0,
            "id": "a",
            "reasons": ["OUT_OF_WINDOW"],
            "detail": entry["detail"],
        }
        assert entry["detail"]
        assert document["totals"]["byReason"]["OUT_OF_WINDOW"] == 1
    else:
        assert only_placement(document) == (placed_in, "a", [])


@pytest.mark.parametrize(
    ("occurred_at", "placed_in"),
    [
        # +05:30 normalised to UTC: 07:15+05:30 is 01:45Z.
        pytest.param("2024-01-01T07:15:00+05:30", "20240101T010000Z", id="plus-0530"),
        # 00:30+01:00 is 23:30Z the day before: before start.
        pytest.param("2024-01-01T00:30:00+01:00", None, id="plus-0100-before-start"),
        # 20:00-05:00 the day before is exactly 01:00Z: the second partition's start.
        pytest.param("2023-12-31T20:00:00-05:00", "20240101T010000Z", id="minus-0500-on-boundary"),
        pytest.param("2024-01-01T02:59:59+00:00", "20240101T020000Z", id="plus-0000"),
        # 03:30+00:30 is 03:00Z: the end, excluded.
        pytest.param("2024-01-01T03:30:00+00:30", None, id="plus-0030-at-end"),
        pytest.param("2024-01-01T05:59:59.999999+03:00", "20240101T020000Z", id="plus-0300-end-minus-1us"),
    ],
)
def test_offsets_are_normalised_to_utc(occurred_at: str, placed_in: str | None) -> None:
    document = decide([rec("a", occurred_at)])
    if placed_in is None:
        assert only_unplaced(document)["reasons"] == ["OUT_OF_WINDOW"]
    else:
        assert only_placement(document) == (placed_in, "a", [])


@pytest.mark.parametrize(
    ("occurred_at", "placed_in"),
    [
        pytest.param("2024-01-01T00:59:59.9999999Z", "20240101T000000Z", id="7-digits-truncated-not-rounded"),
        pytest.param("2024-01-01T00:59:59.999999999999Z", "20240101T000000Z", id="12-digits-truncated"),
        pytest.param("2024-01-01T01:00:00.0Z", "20240101T010000Z", id="one-zero-digit"),
        pytest.param("2024-01-01T01:00:00.000000Z", "20240101T010000Z", id="six-zero-digits"),
        pytest.param("2024-01-01T02:59:59.5Z", "20240101T020000Z", id="half-second"),
        pytest.param("2024-01-01T02:59:59.9999999Z", "20240101T020000Z", id="end-minus-0.1us-truncated"),
    ],
)
def test_fractional_seconds(occurred_at: str, placed_in: str) -> None:
    assert only_placement(decide([rec("a", occurred_at)])) == (placed_in, "a", [])


def test_fractional_start_boundary() -> None:
    request = make_request(
        [rec("before", "2024-01-01T00:00:00.4Z"), rec("at", "2024-01-01T00:00:00.5Z")],
        start="2024-01-01T00:00:00.5Z",
        end="2024-01-01T00:00:10Z",
        chunkSeconds=4,
    )
    document = dry_run(request)
    assert [(u["id"], u["reasons"]) for u in document["unplaced"]] == [("before", ["OUT_OF_WINDOW"])]
    assert document["partitions"][0]["key"] == "20240101T000000.500000Z"
    assert document["partitions"][0]["add"] == ["at"]


# ----------------------------------------------------------------------------------------------------------
# CONSENT_MISSING


@pytest.mark.parametrize(
    "consent",
    [
        pytest.param(False, id="false"),
        pytest.param(None, id="null"),
        pytest.param(_MISSING, id="missing"),
        pytest.param("true", id="string-true"),
        pytest.param(1, id="one"),
        pytest.param(1.0, id="one-float"),
        pytest.param([True], id="array"),
        pytest.param({"granted": True}, id="object"),
    ],
)
def test_consent_missing(consent: Any) -> None:
    records = [rec("a", consentGranted=consent)]
    assert reasons_of(records) == ["CONSENT_MISSING"]
    assert reasons_of(records, {}) == ["CONSENT_MISSING"]
    assert reasons_of(records, {"requireConsent": True}) == ["CONSENT_MISSING"]
    # requireConsent false: consent does not matter.
    assert reasons_of(records, {"requireConsent": False}) == []


def test_consent_true_is_added() -> None:
    assert reasons_of([rec("a", consentGranted=True)]) == []
    assert reasons_of([rec("a", consentGranted=True)], {"requireConsent": False}) == []


# ----------------------------------------------------------------------------------------------------------
# JURISDICTION_NOT_ALLOWED


@pytest.mark.parametrize(
    ("allowed", "jurisdiction", "expected"),
    [
        pytest.param(["US "], " us", [], id="trimmed-uppercased-both-sides"),
        pytest.param(["us"], "US", [], id="policy-lowercase"),
        pytest.param(["US", "CA"], "\tca\n", [], id="record-tabs-newlines"),
        pytest.param(["US", "us", " US"], "us", [], id="policy-duplicates"),
        pytest.param(["US"], "MX", ["JURISDICTION_NOT_ALLOWED"], id="not-listed"),
        pytest.param(["US"], "U S", ["JURISDICTION_NOT_ALLOWED"], id="inner-space-kept"),
        pytest.param(["US"], "USA", ["JURISDICTION_NOT_ALLOWED"], id="prefix-not-enough"),
        pytest.param(["US"], _MISSING, ["JURISDICTION_NOT_ALLOWED"], id="missing"),
        pytest.param(["US"], None, ["JURISDICTION_NOT_ALLOWED"], id="null"),
        pytest.param(["US"], 1, ["JURISDICTION_NOT_ALLOWED"], id="number"),
        pytest.param(["US"], ["US"], ["JURISDICTION_NOT_ALLOWED"], id="array"),
        pytest.param(["US"], "", ["JURISDICTION_NOT_ALLOWED"], id="empty-string"),
        pytest.param(["US"], "   ", ["JURISDICTION_NOT_ALLOWED"], id="blank-string"),
        pytest.param([""], "  ", [], id="blank-allowed-matches-blank"),
        pytest.param([], "US", ["JURISDICTION_NOT_ALLOWED"], id="empty-list-allows-nothing"),
        pytest.param([], _MISSING, ["JURISDICTION_NOT_ALLOWED"], id="empty-list-missing"),
        pytest.param(None, "XX", [], id="null-list-allows-all"),
        pytest.param(None, _MISSING, [], id="null-list-missing-jurisdiction"),
        pytest.param(None, 5, [], id="null-list-non-string"),
        pytest.param(_MISSING, "XX", [], id="absent-list-allows-all"),
        pytest.param(_MISSING, _MISSING, [], id="absent-list-missing"),
    ],
)
def test_jurisdiction(allowed: Any, jurisdiction: Any, expected: list[str]) -> None:
    policies = {} if allowed is _MISSING else {"allowedJurisdictions": allowed}
    assert reasons_of([rec("a", jurisdiction=jurisdiction)], policies) == expected


# ----------------------------------------------------------------------------------------------------------
# RETENTION_EXPIRED

CUTOFF = "2024-06-01T00:00:00Z"


@pytest.mark.parametrize(
    ("retention", "expected"),
    [
        pytest.param("2024-06-01T00:00:00Z", ["RETENTION_EXPIRED"], id="equal-cutoff-expired"),
        pytest.param("2024-06-01T02:00:00+02:00", ["RETENTION_EXPIRED"], id="equal-cutoff-other-offset"),
        pytest.param(
            "2024-06-01T00:00:00.0000009Z", ["RETENTION_EXPIRED"], id="sub-us-after-truncated-equal"
        ),
        pytest.param("2024-05-31T23:59:59.999999Z", ["RETENTION_EXPIRED"], id="1us-before"),
        pytest.param("2024-06-01T00:00:00.000001Z", [], id="1us-after-kept"),
        pytest.param("2024-06-01T00:00:00.000001+00:00", [], id="1us-after-plus-0000"),
        pytest.param("2030-01-01T00:00:00Z", [], id="far-after"),
        pytest.param(_MISSING, ["RETENTION_EXPIRED"], id="missing-fails-closed"),
        pytest.param(None, ["RETENTION_EXPIRED"], id="null-fails-closed"),
    ],
)
def test_retention(retention: Any, expected: list[str]) -> None:
    records = [rec("a", retentionExpiresAt=retention)]
    assert reasons_of(records, {"retentionCutoff": CUTOFF}) == expected
    # Cutoff given in another offset: the same instant.
    assert reasons_of(records, {"retentionCutoff": "2024-05-31T19:00:00-05:00"}) == expected


@pytest.mark.parametrize("retention", [_MISSING, None, "2000-01-01T00:00:00Z"])
def test_retention_without_cutoff(retention: Any) -> None:
    assert reasons_of([rec("a", retentionExpiresAt=retention)]) == []
    assert reasons_of([rec("a", retentionExpiresAt=retention)], {"retentionCutoff": None}) == []


# ----------------------------------------------------------------------------------------------------------
# ALREADY_PRESENT


def test_already_present() -> None:
    records = [rec("a"), rec("A"), rec(" a"), rec("b")]
    document = decide(records, existingTargetIds=["a", "zzz"])
    assert sorted(placements(document)) == sorted(
        [
            ("20240101T000000Z", "a", ["ALREADY_PRESENT"]),
            ("20240101T000000Z", "A", []),  # ids compare as exact strings
            ("20240101T000000Z", " a", []),
            ("20240101T000000Z", "b", []),
        ]
    )


# ----------------------------------------------------------------------------------------------------------
# DUPLICATE_ID


def test_duplicate_identical_copies() -> None:
    record = rec("a", amount=12, tags=["x"])
    document = decide([record, copy.deepcopy(record), copy.deepcopy(record)])
    part = document["partitions"][0]
    assert part["add"] == ["a"]
    assert part["omit"] == [{"id": "a", "reasons": ["DUPLICATE_ID"]}] * 2
    assert part["counts"] == {
        "source": 3,
        "add": 1,
        "omit": 2,
        "byReason": dict.fromkeys(PARTITION_REASONS, 0) | {"DUPLICATE_ID": 2},
    }


def test_duplicate_identical_by_canonical_form() -> None:
    # Same record with its keys in another order (and 12.0 == 12 in RFC 8785): identical copies.
    first = {"id": "a", "occurredAt": IN_WINDOW, "consentGranted": True, "amount": 12}
    second = {"amount": 12.0, "consentGranted": True, "occurredAt": IN_WINDOW, "id": "a"}
    part = decide([first, second])["partitions"][0]
    assert part["add"] == ["a"]
    assert part["omit"] == [{"id": "a", "reasons": ["DUPLICATE_ID"]}]


def test_duplicate_identical_copies_with_a_policy_reason() -> None:
    record = rec("a", consentGranted=False)
    part = decide([record, dict(record)])["partitions"][0]
    assert part["add"] == []
    assert part["omit"] == [
        {"id": "a", "reasons": ["CONSENT_MISSING"]},
        {"id": "a", "reasons": ["CONSENT_MISSING", "DUPLICATE_ID"]},
    ]
    assert part["counts"]["byReason"]["CONSENT_MISSING"] == 2
    assert part["counts"]["byReason"]["DUPLICATE_ID"] == 1


def test_duplicate_identical_copies_already_present() -> None:
    record = rec("a")
    part = decide([record, dict(record)], existingTargetIds=["a"])["partitions"][0]
    assert part["omit"] == [
        {"id": "a", "reasons": ["ALREADY_PRESENT"]},
        {"id": "a", "reasons": ["ALREADY_PRESENT", "DUPLICATE_ID"]},
    ]


def test_duplicate_differing_copies_every_placed_copy_omitted() -> None:
    records = [
        rec("a", "2024-01-01T00:10:00Z", amount=1),
        rec("a", "2024-01-01T01:10:00Z", amount=2, consentGranted=False),
        rec("a", "2024-01-01T00:20:00Z", amount=3),
        rec("b"),
    ]
    document = decide(records)
    p0, p1, _ = document["partitions"]
    assert p0["add"] == ["b"]
    assert p0["omit"] == [{"id": "a", "reasons": ["DUPLICATE_ID"]}] * 2
    assert p1["add"] == []
    assert p1["omit"] == [{"id": "a", "reasons": ["CONSENT_MISSING", "DUPLICATE_ID"]}]
    assert document["totals"]["byReason"]["DUPLICATE_ID"] == 3


def test_duplicate_differing_copies_in_one_partition_sorted_by_reasons() -> None:
    records = [rec("a", amount=1), rec("a", amount=2, consentGranted=False, jurisdiction="MX")]
    part = decide(records, {"allowedJurisdictions": ["US"]})["partitions"][0]
    assert part["omit"] == [
        {"id": "a", "reasons": ["CONSENT_MISSING", "JURISDICTION_NOT_ALLOWED", "DUPLICATE_ID"]},
        {"id": "a", "reasons": ["JURISDICTION_NOT_ALLOWED", "DUPLICATE_ID"]},
    ]


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(rec("a", "2023-01-01T00:00:00Z"), id="other-out-of-window"),
        pytest.param(rec("a", "2024-01-01T03:00:00Z"), id="other-at-end"),
        pytest.param(rec("a", "not a time"), id="other-invalid-occurredAt"),
        pytest.param(rec("a", at=_MISSING), id="other-missing-occurredAt"),
        pytest.param(rec("a", retentionExpiresAt="bad"), id="other-invalid-retention"),
    ],
)
def test_duplicate_whose_other_copy_is_unplaced(other: dict[str, Any]) -> None:
    document = decide([other, rec("a")])
    assert only_placement_or_fail(document) == ("20240101T000000Z", "a", ["DUPLICATE_ID"])
    assert len(document["unplaced"]) == 1
    unplaced = document["unplaced"][0]
    assert unplaced["index"] == 0 and unplaced["id"] == "a"
    assert unplaced["reasons"] in (["OUT_OF_WINDOW"], ["INVALID_RECORD"])


def test_identical_unplaced_copies_do_not_matter() -> None:
    # Two identical out-of-window copies and no placed copy: nothing to omit.
    outside = rec("a", "2025-01-01T00:00:00Z")
    document = decide([outside, dict(outside), rec("b")])
    assert placements(document) == [("20240101T000000Z", "b", [])]
    assert [u["reasons"] for u in document["unplaced"]] == [["OUT_OF_WINDOW"]] * 2


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"id": 1, "occurredAt": IN_WINDOW}, id="integer-id"),
        pytest.param({"id": "", "occurredAt": IN_WINDOW}, id="empty-id"),
        pytest.param("a", id="bare-string-record"),
        pytest.param({"id": "A", "occurredAt": IN_WINDOW}, id="other-case"),
        pytest.param({"id": "a ", "occurredAt": IN_WINDOW}, id="trailing-space"),
    ],
)
def test_not_a_duplicate(other: Any) -> None:
    document = decide([rec("a"), other])
    assert ("20240101T000000Z", "a", []) in placements(document)


def test_all_five_reasons_in_fixed_order() -> None:
    records = [
        # Every key order of the record is irrelevant; reasons come in the contract's order.
        {"jurisdiction": "MX", "consentGranted": False, "occurredAt": IN_WINDOW, "id": "a", "v": 1},
        {"id": "a", "occurredAt": IN_WINDOW, "v": 2},
    ]
    document = decide(
        records,
        {"allowedJurisdictions": ["US"], "retentionCutoff": CUTOFF},
        existingTargetIds=["a"],
    )
    part = document["partitions"][0]
    assert part["omit"] == [
        {"id": "a", "reasons": PARTITION_REASONS},
        {
            "id": "a",
            "reasons": [
                "CONSENT_MISSING",
                "JURISDICTION_NOT_ALLOWED",
                "RETENTION_EXPIRED",
                "ALREADY_PRESENT",
                "DUPLICATE_ID",
            ],
        },
    ]
    assert part["counts"]["byReason"] == dict.fromkeys(PARTITION_REASONS, 2)


@pytest.mark.parametrize("mask", range(16))
def test_every_combination_of_reasons_keeps_the_order(mask: int) -> None:
    fields: dict[str, Any] = {}
    if mask & 1:
        fields["consentGranted"] = False
    if mask & 2:
        fields["jurisdiction"] = "MX"
    else:
        fields["jurisdiction"] = "US"
    fields["retentionExpiresAt"] = "2020-01-01T00:00:00Z" if mask & 4 else "2030-01-01T00:00:00Z"
    existing = ["a"] if mask & 8 else []
    policies = {"allowedJurisdictions": ["US"], "retentionCutoff": CUTOFF}
    expected = [reason for bit, reason in enumerate(PARTITION_REASONS[:4]) if mask >> bit & 1]
    assert reasons_of([rec("a", **fields)], policies, existingTargetIds=existing) == expected


# ----------------------------------------------------------------------------------------------------------
# sorting

# U+FF21 sorts before U+1F600 in UTF-8 (and code points) but after it in UTF-16: a UTF-16 sort would fail.
SORT_IDS = ["z", "a", "é", "\uff21", "😀", "B", "\u00ff", "aa", "a\u0000", "Z", "0", "~", "\u0080"]


def test_add_ids_sorted_by_utf8_bytes() -> None:
    shuffled = list(SORT_IDS)
    random.Random(7).shuffle(shuffled)
    part = decide([rec(i) for i in shuffled])["partitions"][0]
    expected = sorted(SORT_IDS, key=lambda s: s.encode("utf-8"))
    assert expected == sorted(SORT_IDS)  # code point order == UTF-8 byte order
    assert part["add"] == expected
    assert part["add"].index("\uff21") < part["add"].index("😀")


def test_omit_entries_sorted_by_id_bytes_then_reasons() -> None:
    records = [rec(i, consentGranted=False, jurisdiction="US") for i in SORT_IDS]
    # Differing copies of "é" with different reasons in the same partition.
    records.append(rec("é", jurisdiction="MX", consentGranted=True))
    records.append(rec("é", jurisdiction="MX", consentGranted=False, x=1))
    random.Random(3).shuffle(records)
    part = decide(records, {"allowedJurisdictions": ["US", "MX"]}, existingTargetIds=["B"])["partitions"][0]
    ids = [o["id"] for o in part["omit"]]
    assert ids == sorted(ids, key=lambda s: s.encode("utf-8"))
    assert part["add"] == []
    e_entries = [o["reasons"] for o in part["omit"] if o["id"] == "é"]
    assert e_entries == sorted(e_entries)
    assert e_entries == [
        ["CONSENT_MISSING", "DUPLICATE_ID"],
        ["CONSENT_MISSING", "DUPLICATE_ID"],
        ["DUPLICATE_ID"],
    ]
    assert {"id": "B", "reasons": ["CONSENT_MISSING", "ALREADY_PRESENT"]} in part["omit"]


def test_unplaced_sorted_by_index_with_ids() -> None:
    records = [
        rec("z", "2020-01-01T00:00:00Z"),
        rec("a"),
        7,
        rec("b", "bad"),
        {"id": 5},
        rec("c", at=_MISSING),
    ]
    document = decide(records)
    assert [(u["index"], u["id"], u["reasons"]) for u in document["unplaced"]] == [
        (0, "z", ["OUT_OF_WINDOW"]),
        (2, None, ["INVALID_RECORD"]),
        (3, "b", ["INVALID_RECORD"]),
        (4, None, ["INVALID_RECORD"]),
        (5, "c", ["INVALID_RECORD"]),
    ]
    assert all(set(u) == {"index", "id", "reasons", "detail"} for u in document["unplaced"])


# ----------------------------------------------------------------------------------------------------------
# partitions: keys and bounds


def test_partitions_last_shorter_and_across_midnight() -> None:
    document = decide([], start="2024-02-28T23:00:00Z", end="2024-02-29T01:30:00Z", chunkSeconds=3600)
    assert [(p["index"], p["key"], p["start"], p["end"]) for p in document["partitions"]] == [
        (0, "20240228T230000Z", "2024-02-28T23:00:00Z", "2024-02-29T00:00:00Z"),
        (1, "20240229T000000Z", "2024-02-29T00:00:00Z", "2024-02-29T01:00:00Z"),
        (2, "20240229T010000Z", "2024-02-29T01:00:00Z", "2024-02-29T01:30:00Z"),
    ]


def test_partitions_fractional_start() -> None:
    document = decide(
        [rec("x", "2024-01-01T00:00:08.25Z"), rec("y", "2024-01-01T00:00:08.249999Z")],
        start="2024-01-01T00:00:00.250Z",
        end="2024-01-01T00:00:10Z",
        chunkSeconds=4,
    )
    assert [(p["key"], p["start"], p["end"]) for p in document["partitions"]] == [
        ("20240101T000000.250000Z", "2024-01-01T00:00:00.250000Z", "2024-01-01T00:00:04.250000Z"),
        ("20240101T000004.250000Z", "2024-01-01T00:00:04.250000Z", "2024-01-01T00:00:08.250000Z"),
        ("20240101T000008.250000Z", "2024-01-01T00:00:08.250000Z", "2024-01-01T00:00:10Z"),
    ]
    assert document["partitions"][1]["add"] == ["y"]
    assert document["partitions"][2]["add"] == ["x"]


def test_partitions_start_with_offset_and_single_short_partition() -> None:
    document = decide([], start="2024-01-01T05:30:00+05:30", end="2024-01-01T00:00:01Z", chunkSeconds=86400)
    assert [(p["index"], p["key"], p["start"], p["end"]) for p in document["partitions"]] == [
        (0, "20240101T000000Z", "2024-01-01T00:00:00Z", "2024-01-01T00:00:01Z"),
    ]


def test_partitions_exact_multiple_has_no_empty_tail() -> None:
    document = decide([], chunkSeconds=1800)
    assert len(document["partitions"]) == 6
    assert document["partitions"][-1]["end"] == "2024-01-01T03:00:00Z"
    assert document["partitions"][-1]["start"] == "2024-01-01T02:30:00Z"


def test_default_chunk_is_one_hour() -> None:
    request = make_request([])
    del request["chunkSeconds"]
    assert [p["key"] for p in dry_run(request)["partitions"]] == [
        "20240101T000000Z",
        "20240101T010000Z",
        "20240101T020000Z",
    ]


# ----------------------------------------------------------------------------------------------------------
# counts and totals

MIXED_RECORDS: list[Any] = [
    rec("ok-1", "2024-01-01T00:05:00Z", jurisdiction="US", retentionExpiresAt="2030-01-01T00:00:00Z"),
    rec("ok-2", "2024-01-01T01:05:00Z", jurisdiction="ca", retentionExpiresAt="2030-01-01T00:00:00Z"),
    rec(
        "no-consent",
        "2024-01-01T00:06:00Z",
        consentGranted=False,
        jurisdiction="US",
        retentionExpiresAt="2030-01-01T00:00:00Z",
    ),
    rec("mx", "2024-01-01T01:06:00Z", jurisdiction="MX", retentionExpiresAt="2030-01-01T00:00:00Z"),
    rec("old", "2024-01-01T02:06:00Z", jurisdiction="US", retentionExpiresAt="2020-01-01T00:00:00Z"),
    rec("two", "2024-01-01T02:07:00Z", consentGranted=None, jurisdiction="MX"),
    rec("legacy", "2024-01-01T02:08:00Z", jurisdiction="US", retentionExpiresAt="2030-01-01T00:00:00Z"),
    rec("dup", "2024-01-01T00:09:00Z", jurisdiction="US", retentionExpiresAt="2030-01-01T00:00:00Z"),
    rec("dup", "2024-01-01T00:09:00Z", jurisdiction="US", retentionExpiresAt="2030-01-01T00:00:00Z"),
    rec("early", "2023-12-31T23:00:00Z"),
    rec("late", "2024-01-01T03:00:00Z"),
    {"id": "broken"},
    42,
]
MIXED_POLICIES = {"allowedJurisdictions": ["US", "CA"], "retentionCutoff": CUTOFF}


def test_counts_and_totals() -> None:
    document = decide(MIXED_RECORDS, MIXED_POLICIES, existingTargetIds=["legacy"])
    p0, p1, p2 = document["partitions"]
    zero = dict.fromkeys(PARTITION_REASONS, 0)
    assert p0["add"] == ["dup", "ok-1"]
    assert p0["omit"] == [
        {"id": "dup", "reasons": ["DUPLICATE_ID"]},
        {"id": "no-consent", "reasons": ["CONSENT_MISSING"]},
    ]
    assert p0["counts"] == {
        "source": 4,
        "add": 2,
        "omit": 2,
        "byReason": zero | {"CONSENT_MISSING": 1, "DUPLICATE_ID": 1},
    }
    assert p1["add"] == ["ok-2"]
    assert p1["counts"] == {
        "source": 2,
        "add": 1,
        "omit": 1,
        "byReason": zero | {"JURISDICTION_NOT_ALLOWED": 1},
    }
    assert p2["add"] == []
    assert p2["omit"] == [
        {"id": "legacy", "reasons": ["ALREADY_PRESENT"]},
        {"id": "old", "reasons": ["RETENTION_EXPIRED"]},
        {"id": "two", "reasons": ["CONSENT_MISSING", "JURISDICTION_NOT_ALLOWED", "RETENTION_EXPIRED"]},
    ]
    assert p2["counts"] == {
        "source": 3,
        "add": 0,
        "omit": 3,
        "byReason": zero
        | {"CONSENT_MISSING": 1, "JURISDICTION_NOT_ALLOWED": 1, "RETENTION_EXPIRED": 2, "ALREADY_PRESENT": 1},
    }
    assert document["totals"] == {
        "records": 13,
        "placed": 9,
        "add": 3,
        "omit": 6,
        "unplaced": 4,
        "byReason": {
            "INVALID_RECORD": 2,
            "OUT_OF_WINDOW": 2,
            "CONSENT_MISSING": 2,
            "JURISDICTION_NOT_ALLOWED": 2,
            "RETENTION_EXPIRED": 2,
            "ALREADY_PRESENT": 1,
            "DUPLICATE_ID": 1,
        },
    }


def test_empty_request_lists_every_reason() -> None:
    document = decide([])
    for part in document["partitions"]:
        assert part["add"] == [] and part["omit"] == []
        assert part["counts"] == {
            "source": 0,
            "add": 0,
            "omit": 0,
            "byReason": dict.fromkeys(PARTITION_REASONS, 0),
        }
    assert document["unplaced"] == []
    assert document["totals"] == {
        "records": 0,
        "placed": 0,
        "add": 0,
        "omit": 0,
        "unplaced": 0,
        "byReason": dict.fromkeys(ALL_REASONS, 0),
    }


def test_dry_run_document_shape() -> None:
    document = decide(MIXED_RECORDS, MIXED_POLICIES)
    assert {
        "runId",
        "dataset",
        "versionLabel",
        "planHash",
        "decisionHash",
        "partitions",
        "unplaced",
        "totals",
    } <= set(document)
    assert (document["runId"], document["dataset"], document["versionLabel"]) == ("run-1", "events", "v1")
    for part in document["partitions"]:
        assert {"index", "key", "start", "end", "add", "omit", "counts"} <= set(part)
        assert list(part["counts"]["byReason"]) == PARTITION_REASONS
    assert list(document["totals"]["byReason"]) == ALL_REASONS


# ----------------------------------------------------------------------------------------------------------
# input order never matters


def _without_unplaced_indexes(document: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(document)
    stripped.pop("decisionHash")
    stripped["unplaced"] = sorted(
        json.dumps({k: v for k, v in u.items() if k != "index"}, sort_keys=True) for u in stripped["unplaced"]
    )
    return stripped


@pytest.mark.parametrize("seed", range(5))
def test_input_order_never_matters(seed: int) -> None:
    records = [
        *MIXED_RECORDS,
        rec("é", consentGranted=False),
        rec("😀"),
        rec("dup2", amount=1),
        rec("dup2", amount=2),
    ]
    reference = decide(records, MIXED_POLICIES, existingTargetIds=["legacy", "ok-2"])
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    existing = ["ok-2", "legacy", "ok-2"]
    allowed = ["ca", "US ", "US"]
    document = decide(
        shuffled, {**MIXED_POLICIES, "allowedJurisdictions": allowed}, existingTargetIds=existing
    )
    assert _without_unplaced_indexes(document) == _without_unplaced_indexes(reference)
    assert document["planHash"] == reference["planHash"]


@pytest.mark.parametrize("seed", range(5))
def test_input_order_never_matters_decision_hash(seed: int) -> None:
    placed_only = [
        r for r in MIXED_RECORDS if isinstance(r, dict) and r.get("id") not in ("early", "late", "broken")
    ]
    reference = decide(placed_only, MIXED_POLICIES, existingTargetIds=["legacy"])
    assert reference["unplaced"] == []
    shuffled = list(placed_only)
    random.Random(seed).shuffle(shuffled)
    document = decide(shuffled, MIXED_POLICIES, existingTargetIds=["legacy"])
    assert document == reference


# ----------------------------------------------------------------------------------------------------------
# planHash and decisionHash recomputed from the contract's formula


HASH_REQUESTS = [
    pytest.param(make_request([]), id="empty"),
    pytest.param(
        make_request(MIXED_RECORDS, MIXED_POLICIES, existingTargetIds=["legacy", "a", "legacy"]), id="mixed"
    ),
    pytest.param(
        make_request(
            [
                # Non-ASCII, floats, large integers and keys whose UTF-16 order differs from code point order.
                rec(
                    "é", amount=1.5, big=2**53 - 1, neg=-(2**53 - 1), nested={"\uff21": 1, "😀": [True, None]}
                ),
                rec("😀", amount=1e21, small=1e-7, text='ü\n\t"\\'),
                rec("x", "2024-01-01T07:15:00.1234567+05:30"),
                {"not": "a record"},
                "string record",
            ],
            {
                "requireConsent": False,
                "allowedJurisdictions": [" us", "CA", "ca "],
                "retentionCutoff": "2024-05-31T19:00:00.5-05:00",
                "onViolation": "block",
            },
            start="2024-01-01T05:30:00.000001+05:30",
            end="2024-01-01T02:00:00Z",
            chunkSeconds=1000,
            versionLabel="v2.beta",
            existingTargetIds=["é", "😀", "\uff21"],
            metadata={"initiator": "ops", "n": [1, {"x": None}]},
            expectedDecisionHash=None,
        ),
        id="non-ascii-floats-offsets",
    ),
    pytest.param(make_request([rec("a")], {"allowedJurisdictions": []}), id="empty-allowed-list"),
    pytest.param(
        make_request([rec("a")], {"allowedJurisdictions": None, "retentionCutoff": None}), id="null-policies"
    ),
]


@pytest.mark.parametrize("request_document", HASH_REQUESTS)
def test_hashes_recomputed_from_the_contract(request_document: dict[str, Any]) -> None:
    document = dry_run(request_document)
    plan_hash = expected_plan_hash(request_document)
    assert document["planHash"] == plan_hash
    assert document["decisionHash"] == expected_decision_hash(plan_hash, document)
    for value in (document["planHash"], document["decisionHash"]):
        assert value.startswith("sha256:") and len(value) == 71
        int(value[7:], 16)
        assert value == value.lower()


def test_plan_hash_ignores_run_id_and_metadata() -> None:
    base = dry_run(make_request(MIXED_RECORDS, MIXED_POLICIES))
    other = dry_run(make_request(MIXED_RECORDS, MIXED_POLICIES, runId="another-run", metadata={"who": "me"}))
    assert other["planHash"] == base["planHash"]
    assert other["decisionHash"] == base["decisionHash"]
    assert other["runId"] == "another-run"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"dataset": "other"}, id="dataset"),
        pytest.param({"versionLabel": "v2"}, id="versionLabel"),
        pytest.param({"chunkSeconds": 1800}, id="chunkSeconds"),
        pytest.param({"end": "2024-01-01T04:00:00Z"}, id="end"),
        pytest.param({"existingTargetIds": ["zz"]}, id="existingTargetIds"),
        pytest.param({"policies": {**MIXED_POLICIES, "onViolation": "block"}}, id="onViolation"),
        pytest.param({"policies": {**MIXED_POLICIES, "requireConsent": False}}, id="requireConsent"),
        pytest.param({"sourceRecords": [*MIXED_RECORDS, rec("new")]}, id="records"),
    ],
)
def test_plan_hash_covers_each_input(change: dict[str, Any]) -> None:
    base_request = make_request(MIXED_RECORDS, MIXED_POLICIES)
    changed_request = {**base_request, **change}
    base, changed = dry_run(base_request), dry_run(changed_request)
    assert changed["planHash"] != base["planHash"]
    assert changed["planHash"] == expected_plan_hash(changed_request)


def test_equivalent_instants_give_the_same_plan_hash() -> None:
    a = dry_run(make_request([], {"retentionCutoff": CUTOFF}))
    b = dry_run(
        make_request(
            [],
            {"retentionCutoff": "2024-06-01T05:30:00.000000+05:30"},
            start="2023-12-31T19:00:00-05:00",
            end="2024-01-01T03:00:00.0000009Z",
        )
    )
    assert a["planHash"] == b["planHash"]


# ----------------------------------------------------------------------------------------------------------
# property: the engine against a plain-Python reading of CONTRACT section 2

_IDS = ["a", "b", "é", "😀", "B", ""]
_TIMES = [
    "2023-12-31T23:59:59.999999Z",
    "2024-01-01T00:00:00Z",
    "2024-01-01T00:59:59.999999Z",
    "2024-01-01T01:00:00+00:00",
    "2024-01-01T07:15:00+05:30",
    "2024-01-01T02:59:59.9999999Z",
    "2024-01-01T03:00:00Z",
    "2024-01-01T00:10:00",
    "garbage",
]
_RETENTIONS = [CUTOFF, "2024-06-01T00:00:00.000001Z", "2020-01-01T00:00:00Z", None, "nope"]


@st.composite
def _records(draw: st.DrawFn) -> list[Any]:
    out: list[Any] = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.integers(0, 15)) == 0:
            out.append(draw(st.sampled_from([1, "x", None, []])))
            continue
        record: dict[str, Any] = {}
        for name, values in (
            ("id", [*_IDS, 3]),
            ("occurredAt", _TIMES),
            ("consentGranted", [True, True, False, None, "true", 1]),
            ("jurisdiction", ["US", " us ", "CA", "MX", "", None, 1]),
            ("retentionExpiresAt", _RETENTIONS),
            ("v", [0, 1]),
        ):
            if draw(st.integers(0, 5)):  # mostly present
                record[name] = draw(st.sampled_from(values))
        out.append(record)
        if out and draw(st.integers(0, 4)) == 0:
            out.append(copy.deepcopy(draw(st.sampled_from(out))))
    return out


def _us(instant: object) -> int | None:
    try:
        if (
            not isinstance(instant, str)
            or "T" not in instant
            or not (instant.endswith("Z") or instant[-6] in "+-")
        ):
            return None
        parsed = datetime.fromisoformat(instant)
    except (ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        return None
    return (parsed - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _reference(
    request: dict[str, Any],
) -> tuple[list[tuple[str, str, list[str]]], list[tuple[int, Any, str]]]:
    policies = request.get("policies", {})
    start, end, chunk = _us(request["start"]), _us(request["end"]), request["chunkSeconds"] * 1_000_000
    assert start is not None and end is not None
    records = request["sourceRecords"]
    existing = set(request.get("existingTargetIds", []))
    allowed = policies.get("allowedJurisdictions")
    allowed_set = None if allowed is None else {a.strip().upper() for a in allowed}
    cutoff = policies.get("retentionCutoff")
    cutoff_us = None if cutoff is None else _us(cutoff)

    def valid_id(r: Any) -> str | None:
        return r["id"] if isinstance(r, dict) and isinstance(r.get("id"), str) and r["id"] else None

    canon: dict[str, set[bytes]] = {}
    for r in records:
        vid = valid_id(r)
        if vid is not None:
            canon.setdefault(vid, set()).add(rfc8785.dumps(r))
    counts = {i: sum(valid_id(r) == i for r in records) for i in canon}
    decided_once: set[str] = set()

    placed: list[tuple[str, str, list[str]]] = []
    unplaced: list[tuple[int, Any, str]] = []
    for index, r in enumerate(records):
        rid = r.get("id") if isinstance(r, dict) else None
        shown = rid if isinstance(rid, str) else None
        if not isinstance(r, dict) or valid_id(r) is None:
            unplaced.append((index, shown, "INVALID_RECORD"))
            continue
        assert isinstance(rid, str)  # valid_id(r) is not None
        occ = _us(r.get("occurredAt"))
        ret_raw = r.get("retentionExpiresAt")
        ret_us = None if ret_raw is None else _us(ret_raw)
        if occ is None or (ret_raw is not None and ret_us is None):
            unplaced.append((index, shown, "INVALID_RECORD"))
            continue
        if not start <= occ < end:
            unplaced.append((index, shown, "OUT_OF_WINDOW"))
            continue
        reasons = []
        if policies.get("requireConsent", True) and r.get("consentGranted") is not True:
            reasons.append("CONSENT_MISSING")
        if allowed_set is not None:
            j = r.get("jurisdiction")
            if not isinstance(j, str) or j.strip().upper() not in allowed_set:
                reasons.append("JURISDICTION_NOT_ALLOWED")
        if cutoff_us is not None and (ret_us is None or ret_us <= cutoff_us):
            reasons.append("RETENTION_EXPIRED")
        if rid in existing:
            reasons.append("ALREADY_PRESENT")
        if counts[rid] > 1:
            if len(canon[rid]) > 1 or rid in decided_once:
                reasons.append("DUPLICATE_ID")
            decided_once.add(rid)
        key = datetime.fromtimestamp((start + (occ - start) // chunk * chunk) / 1e6, UTC).strftime(
            "%Y%m%dT%H%M%SZ"
        )
        placed.append((key, rid, reasons))
    return sorted(placed, key=lambda p: (p[0], p[1].encode(), p[2])), unplaced


@settings(max_examples=60, deadline=None)
@given(
    records=_records(),
    require_consent=st.booleans(),
    allowed=st.sampled_from([_MISSING, None, [], ["US"], ["us ", "CA"]]),
    cutoff=st.sampled_from([_MISSING, None, CUTOFF]),
    existing=st.lists(st.sampled_from(_IDS[:5]), max_size=3),
)
def test_engine_matches_a_plain_reading_of_the_contract(
    records: list[Any], require_consent: bool, allowed: Any, cutoff: Any, existing: list[str]
) -> None:
    policies: dict[str, Any] = {"requireConsent": require_consent}
    if allowed is not _MISSING:
        policies["allowedJurisdictions"] = allowed
    if cutoff is not _MISSING:
        policies["retentionCutoff"] = cutoff
    request = make_request(records, policies, existingTargetIds=existing)
    document = dry_run(request)
    expected_placed, expected_unplaced = _reference(request)
    actual = sorted(placements(document), key=lambda p: (p[0], p[1].encode(), p[2]))
    assert actual == expected_placed
    assert [(u["index"], u["id"], u["reasons"][0]) for u in document["unplaced"]] == expected_unplaced
    assert all(len(u["reasons"]) == 1 for u in document["unplaced"])
    for part in document["partitions"]:
        assert part["add"] == sorted(part["add"], key=str.encode)
        omit_keys = [(o["id"].encode(), o["reasons"]) for o in part["omit"]]
        assert omit_keys == sorted(omit_keys)
        assert part["counts"]["source"] == part["counts"]["add"] + part["counts"]["omit"]
    plan_hash = expected_plan_hash(request)
    assert document["planHash"] == plan_hash
    assert document["decisionHash"] == expected_decision_hash(plan_hash, document)
