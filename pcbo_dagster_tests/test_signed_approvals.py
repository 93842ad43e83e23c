"""Signed approvals (issue 11): forged, replayed (another rollout, another decision hash) and unlisted
approvals open no gate, whether they are offered to `pcbo approve` (refused, nothing written) or put
on the production chain directly by someone who can append to it (ignored by the gate). A
`requiredApprovals: 2` rollout waits for two distinct listed approvers. A genuine approval replayed
after a rejection, or signed before it and brought later, does not override the rejection."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.catalog.rollouts import RolloutRow
from pcbo_dagster.core.audit_chain import RESERVED_KEYS
from pcbo_dagster.core.canonical import jcs
from pcbo_dagster.core.errors import Blocked, InvalidInput
from pcbo_dagster.core.rollout_lifecycle import rollout_subject
from pcbo_dagster.core.signed_approvals import read_signed_approval, sign_approval
from pcbo_dagster.core.signed_note import NoteError, parse_note, sign_note, signing_key_from_seed
from pcbo_dagster.datasets.config import DatasetsConfig, parse_datasets_config
from pcbo_dagster.engine.events import PRODUCER
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.engine.verify import verify
from pcbo_dagster.rollout import operations
from pcbo_dagster.rollout.approvals import (
    ROLLOUT_APPROVED,
    ROLLOUT_REJECTED,
    decision_in_force,
    sign_decision,
)
from pcbo_dagster.rollout.clock import ManualClock
from pcbo_dagster_tests.approver_keys import BO, CY, MALLORY
from pcbo_dagster_tests.catalog_writer import write_catalog
from pcbo_dagster_tests.test_rollout_staging_and_approvals import KEYS, T0, _config

WHEN = "2026-01-05T09:00:00Z"


def _soaked(tmp_path: Path, required: int = 1) -> tuple[DatasetsConfig, Settings, ManualClock, RolloutRow]:
    """Two rollouts staged and soaked (`r` and `other`, over different keys)."""
    config = _config(tmp_path, throttle="{}")
    if required != 1:
        dataset = config.dataset("sessions")
        assert dataset.rollout is not None
        rollout = dataset.rollout.model_copy(update={"requiredApprovals": required})
        config = config.model_copy(update={"datasets": [dataset.model_copy(update={"rollout": rollout})]})
    base = Settings.resolve(home=str(tmp_path / "home"), env={})
    clock = ManualClock(T0)
    operations.start(config, base, "sessions", KEYS[0], KEYS[1], by="ana", name="r", clock=clock)
    operations.start(config, base, "sessions", KEYS[2], KEYS[2], by="ana", name="other", clock=clock)
    clock.advance(600)
    operations.soak(config, base, clock=clock)
    return config, base, clock, operations.find_rollout(base, "r")


def _gate(config: DatasetsConfig, base: Settings, clock: ManualClock) -> dict[str, Any]:
    return operations.status(config, base, "r", clock=clock)["gate"]


def _append_directly(
    config: DatasetsConfig,
    base: Settings,
    rollout: RolloutRow,
    statement: str,
    by: str,
    decision: str = "approved",
) -> None:
    """What someone who can append to the production chain (but holds no approver's key) can do."""
    with operations.rollout_environments(config, base, rollout["name"]) as (_dataset, envs):
        envs.production.audit.append(
            "sessions/v1",
            ROLLOUT_APPROVED if decision == "approved" else ROLLOUT_REJECTED,
            {
                "rollout": rollout_subject(rollout),
                "decision": decision,
                "decision_hash": rollout["decision_hash"],
                "plan_hash": rollout["plan_hash"],
                "by": by,
                "reason": "looks fine",
                "signed_approval": statement,
                "producer": PRODUCER,
            },
        )


def _forged(statement: str) -> str:
    note = parse_note(statement)
    line = note.signatures[0]
    raw = bytearray(line.signature)
    raw[0] ^= 1
    blob = base64.b64encode(line.key_id + bytes(raw)).decode()
    return note.text + f"\n\u2014 {line.name} {blob}\n"


def test_a_signed_approval_opens_the_gate_and_names_its_signer(tmp_path: Path) -> None:
    config, base, clock, rollout = _soaked(tmp_path)
    result = operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)
    assert result["by"] == CY.name
    gate = _gate(config, base, clock)
    assert gate["open"] is True, gate["reasons"]
    assert gate["approval"]["actor"] == CY.name and gate["approval"]["approvals"] == 1


@pytest.mark.parametrize(
    "attack",
    ["forged", "other_rollout", "other_decision_hash", "unlisted_key", "bare_name", "lone_surrogate"],
)
def test_bad_approvals_are_refused_when_recorded_and_ignored_on_the_chain(
    tmp_path: Path, attack: str
) -> None:
    config, base, clock, rollout = _soaked(tmp_path)
    other = operations.find_rollout(base, "other")
    statement = {
        "forged": lambda: _forged(sign_decision(CY, rollout, "approve", "ok", None, WHEN)),
        "other_rollout": lambda: sign_decision(CY, other, "approve", "ok", None, WHEN),
        "other_decision_hash": lambda: sign_approval(
            CY, "r", "approved", "sha256:" + "1" * 64, "ok", WHEN
        ).render(),
        "unlisted_key": lambda: sign_decision(MALLORY, rollout, "approve", "ok", None, WHEN),
        "bare_name": lambda: "approved by cy\n",
        # Signed by a listed key, but its JSON escapes a lone surrogate, which no UTF-8 text holds:
        # reading it raised rfc8785's CanonicalizationError (an internal error), and once appended to
        # the chain, every later gate, status and approval of the rollout with it.
        "lone_surrogate": lambda: sign_note(
            sign_approval(CY, "r", "approved", rollout["decision_hash"] or "", "ok", WHEN).text.replace(
                '"ok"', '"\\ud800"'
            ),
            CY,
        ).render(),
    }[attack]()
    with pytest.raises(InvalidInput):
        operations.decide(config, base, "r", None, statement=statement, clock=clock)
    gate = _gate(config, base, clock)
    assert gate["open"] is False and any("no signed approval yet" in r for r in gate["reasons"])
    # Appended to the production chain by hand (the chain still verifies): the gate ignores it.
    _append_directly(config, base, rollout, statement, CY.name)
    gate = _gate(config, base, clock)
    assert gate["open"] is False and any("no signed approval yet" in r for r in gate["reasons"]), gate
    with pytest.raises(Blocked):
        operations.promote(config, base, "r", by="dee", clock=clock)


def test_an_approval_of_another_rollout_is_not_replayed_into_this_one(tmp_path: Path) -> None:
    """A genuine approval of `other`, recorded for `other`, does not count for `r`."""
    config, base, clock, _ = _soaked(tmp_path)
    operations.decide(config, base, "other", "approve", key=CY, reason="fine", clock=clock)
    gate = _gate(config, base, clock)
    assert gate["open"] is False and any("no signed approval yet" in r for r in gate["reasons"])


def test_approval_rows_the_chain_does_not_record_are_reported(tmp_path: Path) -> None:
    """`rollout_approvals` rows inserted into the catalog by hand: one naming an event the chain does
    not hold, one naming the genuine approval's event but another approver and reason. The gate
    ignored them, but `pcbo verify` said clean while `pcbo rollout status` listed them as approvals
    (an approval by BO that BO never signed). Now each is `rollout_approval_not_on_chain`."""
    config, base, clock, rollout = _soaked(tmp_path)
    genuine = operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)
    assert _verify_findings(config, base) == []
    insert = (
        "INSERT INTO rollout_approvals (rollout, decision, decision_hash, actor, reason, event_hash, "
        "recorded_at) VALUES ('r', 'approved', :hash, :actor, :reason, :event, :at)"
    )
    forged = {
        "hash": rollout["decision_hash"],
        "actor": BO.name,
        "reason": "lgtm",
        "at": T0.replace(tzinfo=None),
    }
    write_catalog(
        base,
        (insert, {**forged, "event": "sha256:" + "0" * 64}),  # no such event
        (insert, {**forged, "event": genuine["auditEventHash"]}),  # CY's event, BO's name
    )
    assert [row["actor"] for row in operations.status(config, base, "r", clock=clock)["approvals"]] == [
        CY.name,
        BO.name,
        BO.name,
    ]
    assert _gate(config, base, clock)["approval"]["approvals"] == 1  # the gate counts CY's alone
    findings = _verify_findings(config, base)
    assert [kind for kind, _ in findings] == ["rollout_approval_not_on_chain"] * 2, findings
    assert all(f"approved by {BO.name}" in detail for _, detail in findings)


def test_approval_events_whose_statement_does_not_verify_are_reported(tmp_path: Path) -> None:
    """Approval events appended to the production chain by someone who can write it (every hash right)
    but holds no approver's key: the genuine approval's event with its signature flipped, with another
    rollout's genuine statement, and word for word again. The gate ignored them, but `pcbo verify`
    said clean. Now each is `rollout_approval_signature_invalid`: its statement must verify under the
    key its event names and say what its event says, and count once. (Whether that key is listed is
    the gate's to judge: verify reads no datasets config.)"""
    config, base, clock, _ = _soaked(tmp_path)
    other = operations.find_rollout(base, "other")
    operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)
    assert _verify_findings(config, base) == []
    with operations.rollout_environments(config, base, "r") as (_dataset, envs):
        chain = envs.production.audit.backup.read_chain("sessions/v1")
        [genuine] = [e for e in chain if e["event_type"] == ROLLOUT_APPROVED]
        body = {k: v for k, v in genuine.items() if k not in RESERVED_KEYS}
        for forged in (
            {**body, "signed_approval": _forged(body["signed_approval"])},
            {**body, "signed_approval": sign_decision(CY, other, "approve", "ok", None, WHEN)},
            body,
        ):
            envs.production.audit.append("sessions/v1", ROLLOUT_APPROVED, forged)
    findings = _verify_findings(config, base)
    assert [kind for kind, _ in findings] == ["rollout_approval_signature_invalid"] * 3, findings
    assert f"repeats the signed statement of seq {genuine['chain']['seq']}" in findings[2][1]
    assert _gate(config, base, clock)["approval"]["approvals"] == 1


def _verify_findings(config: DatasetsConfig, base: Settings) -> list[tuple[str, str]]:
    with operations.dataset_environments(config, config.dataset("sessions"), base) as envs:
        return [(f["kind"], f["detail"]) for f in verify(envs.production)["findings"]]


def test_required_approvals_need_distinct_listed_approvers(tmp_path: Path) -> None:
    config, base, clock, _ = _soaked(tmp_path, required=2)
    operations.decide(config, base, "r", "approve", key=CY, reason="one", clock=clock)
    operations.decide(config, base, "r", "approve", key=CY, reason="one again", clock=clock)
    gate = _gate(config, base, clock)
    assert gate["open"] is False and any("1 of the 2 signed approvals" in r for r in gate["reasons"])
    operations.decide(config, base, "r", "approve", key=BO, reason="two", clock=clock)
    gate = _gate(config, base, clock)
    assert gate["open"] is True and gate["approval"]["approvals"] == 2
    operations.decide(config, base, "r", "reject", key=BO, reason="changed my mind", clock=clock)
    gate = _gate(config, base, clock)
    assert gate["open"] is False and any(f"rejected by {BO.name}" in r for r in gate["reasons"])


def test_a_statement_is_read_only_under_a_listed_key() -> None:
    statement = sign_approval(CY, "r", "approved", "sha256:" + "2" * 64, "ok", WHEN).render()
    assert read_signed_approval(statement, [CY.verifier()]).signer.name == CY.name
    with pytest.raises(NoteError, match="not a listed approver"):
        read_signed_approval(statement, [BO.verifier()])
    impostor = sign_approval(MALLORY, "r", "approved", "sha256:" + "2" * 64, "ok", WHEN).render()
    renamed = impostor.replace(MALLORY.name, CY.name)  # claims to be cy, signed by mallory
    with pytest.raises(NoteError):
        read_signed_approval(renamed, [CY.verifier()])


def _chain_events(config: DatasetsConfig, base: Settings) -> list[dict[str, Any]]:
    with operations.rollout_environments(config, base, "r") as (_dataset, envs):
        return envs.production.audit.backup.read_chain("sessions/v1")


def _in_force(config: DatasetsConfig, base: Settings) -> dict[str, Any]:
    with operations.rollout_environments(config, base, "r") as (_dataset, envs):
        decision = decision_in_force(envs, envs.store.require("r"))
    assert decision is not None
    return decision


def _approved_then_rejected(tmp_path: Path) -> tuple[DatasetsConfig, Settings, ManualClock, RolloutRow, str]:
    """cy approves `r` (the gate opens), a minute later bo rejects it; returns cy's statement as recorded."""
    config, base, clock, rollout = _soaked(tmp_path)
    operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)
    assert _gate(config, base, clock)["open"] is True
    clock.advance(60)
    operations.decide(config, base, "r", "reject", key=BO, reason="found a problem", clock=clock)
    approval = next(e for e in _chain_events(config, base) if e["event_type"] == ROLLOUT_APPROVED)
    return config, base, clock, rollout, approval["signed_approval"]


def _closed_by_the_rejection(config: DatasetsConfig, base: Settings, clock: ManualClock) -> dict[str, Any]:
    gate = _gate(config, base, clock)
    assert gate["open"] is False and any(f"rejected by {BO.name}" in r for r in gate["reasons"]), gate
    with pytest.raises(Blocked):
        operations.promote(config, base, "r", by="dee", clock=clock)
    return gate


def test_an_approval_replayed_after_a_rejection_is_refused_and_ignored(tmp_path: Path) -> None:
    """The red-team attack: cy's genuine approval statement (public, on the chain) brought again after
    bo's rejection, through `pcbo approve --statement` (no key needed) or appended to the chain."""
    config, base, clock, rollout, statement = _approved_then_rejected(tmp_path)
    clock.advance(60)
    before = len(_chain_events(config, base))
    with pytest.raises(InvalidInput, match="already on the chain") as refused:
        operations.decide(config, base, "r", None, statement=statement, clock=clock)
    assert refused.value.field == "statement"
    assert len(_chain_events(config, base)) == before  # nothing written
    _closed_by_the_rejection(config, base, clock)
    _append_directly(config, base, rollout, statement, CY.name)
    _closed_by_the_rejection(config, base, clock)
    assert _in_force(config, base)["ignored"] == 1


def test_an_approval_signed_before_the_rejection_does_not_outlive_it(tmp_path: Path) -> None:
    """cy signed a second approval before bo's rejection but brings it only afterwards: refused when
    recorded, ignored on the chain. A new approval signed after the rejection opens the gate."""
    config, base, clock, rollout = _soaked(tmp_path)
    early = sign_decision(CY, rollout, "approve", "signed early", None, "2026-01-05T08:11:00Z")
    clock.advance(3600)
    operations.decide(config, base, "r", "reject", key=BO, reason="found a problem", clock=clock)
    rejection = next(e for e in _chain_events(config, base) if e["event_type"] == "rollout_rejected")
    assert read_signed_approval(rejection["signed_approval"], [BO.verifier()]).time > "2026-01-05T08:11:00Z"
    with pytest.raises(InvalidInput, match="before the rejection in force"):
        operations.decide(config, base, "r", None, statement=early, clock=clock)
    _append_directly(config, base, rollout, early, CY.name)
    _closed_by_the_rejection(config, base, clock)
    assert _in_force(config, base)["ignored"] == 1
    clock.advance(60)
    operations.decide(config, base, "r", "approve", key=CY, reason="fixed, reviewed again", clock=clock)
    gate = _gate(config, base, clock)
    assert gate["open"] is True and gate["approval"]["actor"] == CY.name, gate


def test_an_approval_dated_in_the_future_does_not_outlive_a_rejection(tmp_path: Path) -> None:
    """The order of an approval and a rejection is their signed times: cy pre-signed an approval dated
    2099 (kept by an operator, or a clock gone wrong). After bo's rejection anyone holding it brought
    it, and as "signed after the rejection" it counted and opened the gate that bo had closed, though
    cy never saw the rejection. Now an approval signed later than the moment it is recorded (beyond a
    clock skew) is refused, and on the chain ignored: a new approval signed after the rejection opens."""
    config, base, clock, rollout = _soaked(tmp_path)
    future = sign_decision(CY, rollout, "approve", "approve whatever comes", None, "2099-01-01T00:00:00Z")
    clock.advance(60)
    operations.decide(config, base, "r", "reject", key=BO, reason="found a problem", clock=clock)
    before = len(_chain_events(config, base))
    with pytest.raises(InvalidInput, match="in the future") as refused:
        operations.decide(config, base, "r", None, statement=future, clock=clock)
    assert refused.value.field == "statement" and len(_chain_events(config, base)) == before
    _append_directly(config, base, rollout, future, CY.name)
    _closed_by_the_rejection(config, base, clock)
    assert _in_force(config, base)["ignored"] == 1
    clock.advance(60)
    operations.decide(config, base, "r", "approve", key=CY, reason="fixed, reviewed again", clock=clock)
    assert _gate(config, base, clock)["open"] is True


def test_a_rejection_dated_in_the_future_holds_off_no_approval_signed_after_it_was_recorded(
    tmp_path: Path,
) -> None:
    """The mirror of the attack above: bo's rejection dated 2099 ordered after every approval signed
    before 2099, so once on the chain no one could approve the rollout again until then. `pcbo reject`
    refuses it; one appended by hand takes effect when its event was appended: it closes the gate, and
    an approval signed after that opens it again."""
    config, base, clock, rollout = _soaked(tmp_path)
    future = sign_decision(BO, rollout, "reject", "never", None, "2099-01-01T00:00:00Z")
    before = len(_chain_events(config, base))
    with pytest.raises(InvalidInput, match="rejection was signed at .* in the future") as refused:
        operations.decide(config, base, "r", None, statement=future, clock=clock)
    assert refused.value.field == "statement" and len(_chain_events(config, base)) == before
    _append_directly(config, base, rollout, future, BO.name, decision="rejected")
    _closed_by_the_rejection(config, base, clock)
    # cy signs after the rejection was appended (events carry the host's time; the rollout clock here
    # is a manual one, so it is moved past that first)
    from datetime import UTC, datetime

    clock.advance((datetime.now(UTC) - clock.now()).total_seconds() + 60)
    operations.decide(config, base, "r", "approve", key=CY, reason="reviewed after bo's note", clock=clock)
    assert _gate(config, base, clock)["open"] is True


def test_a_statement_without_an_instant_is_neither_signed_nor_read() -> None:
    with pytest.raises(NoteError, match="instant"):
        sign_approval(CY, "r", "approved", "sha256:" + "2" * 64, "ok", "yesterday")
    body = {
        "decision": "approved",
        "decision_hash": "sha256:" + "2" * 64,
        "reason": "ok",
        "rollout": "r",
        "signer": CY.name,
        "time": "soon",
    }
    text = "pcbo.approval/v1\n" + jcs(body).decode("utf-8") + "\n"
    with pytest.raises(NoteError, match="not an instant"):
        read_signed_approval(sign_note(text, CY).render(), [CY.verifier()])


def test_one_key_listed_under_two_names_is_refused(tmp_path: Path) -> None:
    """`requiredApprovals: 2` is meant to need two people. The names were checked distinct, the keys
    not: one Ed25519 key listed under two names (cy, and cy-laptop) let its holder sign as both and
    open the gate alone. Now the config is refused, naming the approver listed again."""
    twin = signing_key_from_seed("approvers.example/cy-laptop", bytes([12]) * 32)  # cy's seed
    assert twin.public_key == CY.public_key
    text = f"""
datasets:
  - name: sessions
    partitioning:
      {{kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-01T03:00:00Z"}}
    source: {{uri: s.jsonl}}
    policies: {{requireConsent: true, onViolation: omit}}
    rollout:
      approvers: ["{CY.verifier().text}", "{twin.verifier().text}"]
      requiredApprovals: 2
"""
    with pytest.raises(InvalidInput) as refused:
        parse_datasets_config(text, base_dir=tmp_path)
    assert "approvers[1]" in refused.value.field and "listed" in refused.value.message


def test_a_promotion_names_every_approval_the_gate_counted(tmp_path: Path) -> None:
    """`requiredApprovals: 2`: the promotion event names each approval the gate counted
    (`approval_event_hashes`, in chain order: CY's newest approval, which replaced CY's first, and BO's),
    and still the last of them alone as `approval_event_hash`, as promotions always did."""
    config, base, clock, _ = _soaked(tmp_path, required=2)
    operations.decide(config, base, "r", "approve", key=CY, reason="one", clock=clock)
    operations.decide(config, base, "r", "approve", key=CY, reason="one again", clock=clock)
    operations.decide(config, base, "r", "approve", key=BO, reason="two", clock=clock)
    assert operations.promote(config, base, "r", by="dee", clock=clock)["status"] == "promoted"
    with operations.rollout_environments(config, base, "r") as (_dataset, envs):
        chain = envs.production.audit.backup.read_chain("sessions/v1")
    approvals = {e["reason"]: e["chain"]["event_hash"] for e in chain if e["event_type"] == ROLLOUT_APPROVED}
    [promotion] = [e for e in chain if e["event_type"] == "rollout_promoted"]
    assert promotion["approval_event_hashes"] == [approvals["one again"], approvals["two"]]
    assert promotion["approval_event_hash"] == approvals["two"]
    assert promotion["approved_by"] == f"{CY.name}, {BO.name}"


def test_with_no_approver_listed_the_gate_says_so_not_that_an_approval_is_missing(tmp_path: Path) -> None:
    """The packaged example lists no approvers: a rollout approved under a config that lists them is
    not promotable under one that lists none, and the gate says why (no approver listed, the setting
    to change), not "no signed approval yet" with an invitation to `pcbo approve`, which would be
    refused."""
    config, base, clock, _ = _soaked(tmp_path)
    operations.decide(config, base, "r", "approve", key=CY, reason="numbers reviewed", clock=clock)
    assert _gate(config, base, clock)["open"] is True
    dataset = config.dataset("sessions")
    assert dataset.rollout is not None
    unlisted = dataset.rollout.model_copy(update={"approvers": []})
    bare = config.model_copy(update={"datasets": [dataset.model_copy(update={"rollout": unlisted})]})
    gate = _gate(bare, base, clock)
    assert gate["open"] is False
    (reason,) = [r for r in gate["reasons"] if "approv" in r]
    assert "no approver is listed for dataset 'sessions'" in reason and "rollout.approvers" in reason
    assert "no signed approval yet" not in reason
    with pytest.raises(Blocked):
        operations.promote(bare, base, "r", by="dee", clock=clock)


def test_an_approval_signed_before_the_rollout_was_staged_counts_for_nothing(tmp_path: Path) -> None:
    """Red-team finding: a statement names a rollout and a decision hash, and a rehearsal deployment
    that staged the same range under the same rollout name staged the same hash: cy's approval of the
    rehearsal, signed before production staged its rollout (so after no soak of production's), was
    accepted by production's `pcbo approve --statement` and opened its gate. An approval signed before
    the staging it would approve (beyond the clock skew allowed) is refused when recorded and ignored
    on the chain; a rejection signed then still counts (it opens nothing)."""
    config, base, clock, rollout = _soaked(tmp_path)
    staged = next(e for e in _chain_events(config, base) if e["event_type"] == "rollout_staged")
    rehearsal = sign_decision(CY, rollout, "approve", "rehearsal looked fine", None, "2026-01-04T08:00:00Z")
    before = len(_chain_events(config, base))
    with pytest.raises(InvalidInput, match="before rollout 'r' was staged") as refused:
        operations.decide(config, base, "r", None, statement=rehearsal, clock=clock)
    assert refused.value.field == "statement" and staged["staged_at"] in refused.value.message
    assert len(_chain_events(config, base)) == before
    _append_directly(config, base, rollout, rehearsal, CY.name)
    gate = _gate(config, base, clock)
    assert gate["open"] is False, gate
    operations.decide(config, base, "r", "approve", key=CY, reason="production's soak reviewed", clock=clock)
    assert _gate(config, base, clock)["open"] is True
    assert _in_force(config, base)["ignored"] == 1  # the rehearsal's, on the chain
