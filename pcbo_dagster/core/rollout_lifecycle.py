"""A rollout's lifecycle as its dataset version's production audit chain tells it (pure: events in).

The promotion gate trusts only what is on that chain (and signed): the catalog's `rollouts` and
`soak_evaluations` rows are listings anyone who can write the catalog can edit. So every step the
gate decides on is an event of the production chain, appended before the catalog row, each naming
the rollout (`rollout`: `rollout_subject`):

- `rollout_staged`: the staging apply finished (`decision_hash`, `plan_hash`, `staged_at`,
  `soak_window_seconds`, `by`); the rollout is halted for review and its soak window starts;
- `rollout_soak_evaluated`: one soak evaluation (`passed`, `evaluated_at`, `failed_checks`, each
  check's `passed` and `message`, the staged and current decision hashes and `detail_digest`, the
  digest of the evaluation's whole detail as the catalog's `soak_evaluations` row holds it, and that
  detail as JSON text, `detail_json`, from which `pcbo verify --repair` writes again a row a crash
  lost);
- `rollout_cancelled`, `rollout_rolled_back` (`stage`, `by`, `reason`, `rollback_id`), and
  `rollout_promoted` (`complete`: every partition) and the signed `rollout_approved` /
  `rollout_rejected` (`rollout/approvals.py`).

`lifecycle` folds them in chain order: nothing yet (`status` None) → `soaking` (staged) →
`promoted` (a complete promotion) / `rolled_back` / `cancelled`. The last three are final (only a
rollback still moves a promoted or cancelled rollout to `rolled_back`): a later `rollout_staged`,
soak evaluation or promotion changes nothing (it is counted in `ignored`). A second
`rollout_staged` while soaking (a staging apply run again after a crash between the chain and the
catalog, whose decisions changed meanwhile: over the same decisions `rollout/lifecycle.py` appends
none) names the staged decisions and the window from then on; soak evaluations are those after
the first `rollout_staged`, so a failure is never undone by staging again. Moments are the rollout
clock's, as ISO text (`format_datetime`).

**Signed.** With the operator's key (`PCBO_SIGNING_KEY`), each lifecycle event pcbo appends carries
`operator_signature` (`core/operator_signatures.py`: a signed note over the chain key, the event
type and the digest of the RFC 8785 form of the event's whole body, the signature aside).
`lifecycle(..., verifier=...)` then folds only the events whose signature verifies under the key's
vkey, each statement once (a copy of a signed event appended again counts for nothing): someone who
can write the audit backup and the catalog but holds no key forges no step. Without a key
(`verifier` None) nothing is signed or checked.

`row_disagreements` and `soak_rows_on_chain` say where the catalog's rows differ from the chain: the
gate stays closed on any, and `pcbo verify` reports them; so does `approval_row_disagreements` for
`rollout_approvals` rows (which the gate never reads), and `approval_events_without_row` for
decisions on the chain no row records (a crash between the two). `row_catch_up` recognises the
one disagreement a crash makes (the event appended, the row not yet written: the row is exactly the
state before the rollout's last lifecycle event) and gives the columns `pcbo verify --repair` writes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pcbo_dagster.core.canonical import digest_of
from pcbo_dagster.core.chain_state import TABLE_PUBLICATION_RECORDED
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.instants import format_datetime, parse_instant, to_datetime
from pcbo_dagster.core.operator_signatures import verified_statement
from pcbo_dagster.core.signed_approvals import APPROVAL_EVENTS
from pcbo_dagster.core.signed_note import VerifierKey

ROLLOUT_STAGED = "rollout_staged"
ROLLOUT_SOAK_EVALUATED = "rollout_soak_evaluated"
ROLLOUT_CANCELLED = "rollout_cancelled"
ROLLOUT_ROLLED_BACK = "rollout_rolled_back"
ROLLOUT_PROMOTED = "rollout_promoted"
LIFECYCLE_EVENTS = (
    ROLLOUT_STAGED,
    ROLLOUT_SOAK_EVALUATED,
    ROLLOUT_CANCELLED,
    ROLLOUT_ROLLED_BACK,
    ROLLOUT_PROMOTED,
)
#: Events whose readers count them only when the operator's key signed them (or, approvals, when an
#: approver's key did): an unsigned one is ignored there and reported under its own kind, so it makes
#: no `event_signature_invalid` (`core/operator_signatures.unsigned_events`).
SELF_CHECKED_EVENTS = frozenset({*LIFECYCLE_EVENTS, *APPROVAL_EVENTS, TABLE_PUBLICATION_RECORDED})
SOAKING, PROMOTED, ROLLED_BACK, CANCELLED = "soaking", "promoted", "rolled_back", "cancelled"
FINAL = (PROMOTED, ROLLED_BACK, CANCELLED)
#: The catalog statuses of a rollout the chain has not seen staged (its staging apply under way).
NOT_STAGED = ("applying", "paused", "interrupted")


#: A rollout name: it becomes part of the engine's run ids (`rollout-<name>-production-repair-<12>`,
#: at most 128 characters of `[A-Za-z0-9._-]`) and a directory name (`reports/rollouts/<name>/`).
ROLLOUT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,87}")


def check_rollout_name(name: Any) -> str:
    """`name` when it can name a rollout (`ROLLOUT_NAME`); `InvalidInput` on `rollout` otherwise.
    Checked where a name is given (the staging apply) and again where one read from a catalog row
    becomes a path (the reports): a row anyone who can write the catalog inserted names nothing
    outside its directory."""
    if not isinstance(name, str) or not ROLLOUT_NAME.fullmatch(name):
        raise InvalidInput(
            "rollout",
            f"{str(name)[:100]!r} cannot name a rollout: 1 to 88 letters, digits, '.', '_' or '-', "
            "beginning with a letter or digit (it becomes part of run ids and a directory name)",
        )
    return name


def rollout_subject(rollout: Mapping[str, Any]) -> dict[str, Any]:
    """The rollout as the audit events about it (lifecycle, approval, promotion) name it."""
    return {
        "name": rollout["name"],
        "dataset": rollout["dataset"],
        "version_label": rollout["version_label"],
        "first_key": rollout["first_key"],
        "last_key": rollout["last_key"],
        "partition_count": len(rollout["partition_keys"]),
        "staging_run_id": rollout["staging_run_id"],
    }


def of_rollout(event: Mapping[str, Any], name: str) -> bool:
    """Whether `event` is about rollout `name` (its `rollout` subject names it)."""
    body = event.get("rollout")
    return isinstance(body, Mapping) and body.get("name") == name


def detail_digest(detail: Any) -> str:
    """The digest a `rollout_soak_evaluated` event carries of the evaluation's detail."""
    return digest_of(detail)


@dataclass
class Lifecycle:
    """What the production chain says of one rollout (module doc)."""

    name: str
    status: str | None = None
    #: The `rollout_staged` event in force (the latest while soaking), or None.
    staged: dict[str, Any] | None = None
    #: Every `rollout_soak_evaluated` event since the first `rollout_staged`, in chain order.
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    #: Every `rollout_soak_evaluated` event of the rollout on the chain that counts (signed, once, with
    #: a key): what catalog rows must match.
    all_evaluations: list[dict[str, Any]] = field(default_factory=list)
    #: Lifecycle events that changed nothing (after a final state, or out of order).
    ignored: int = 0
    #: Lifecycle events not counted for want of a valid operator signature (a key given), or because
    #: the same signed statement stood earlier on the chain (a replay).
    unsigned: int = 0

    @property
    def decision_hash(self) -> str | None:
        """The decision hash the rollout staged, by the chain."""
        return None if self.staged is None else self.staged.get("decision_hash")


def lifecycle(
    events: Iterable[Mapping[str, Any]], name: str, verifier: VerifierKey | None = None
) -> Lifecycle:
    """Fold the rollout's lifecycle events of a (verified) production chain, in chain order; with
    `verifier` (the operator key's vkey) only those it signed, each signed statement once."""
    life = Lifecycle(name)
    seen: set[str] = set()
    for event in events:
        kind = event.get("event_type")
        if kind not in LIFECYCLE_EVENTS or not of_rollout(event, name):
            continue
        statement = None if verifier is None else verified_statement(event, verifier)
        if verifier is not None and statement is None:
            life.unsigned += 1
            continue
        if statement is not None:
            if statement in seen:  # the same signed statement again: a replay changes nothing
                life.unsigned += 1
                continue
            seen.add(statement)
        if kind == ROLLOUT_SOAK_EVALUATED:
            life.all_evaluations.append(dict(event))
        if kind == ROLLOUT_ROLLED_BACK and life.status != ROLLED_BACK:
            life.status = ROLLED_BACK  # a promoted or cancelled rollout can still be rolled back
        elif life.status in FINAL:
            life.ignored += 1
        elif kind == ROLLOUT_STAGED:
            life.status, life.staged = SOAKING, dict(event)
        elif kind == ROLLOUT_SOAK_EVALUATED and life.status == SOAKING:
            life.evaluations.append(dict(event))
        elif kind == ROLLOUT_CANCELLED:
            life.status = CANCELLED
        elif kind == ROLLOUT_PROMOTED and life.status == SOAKING:
            if event.get("complete") is True:
                life.status = PROMOTED
        else:
            life.ignored += 1
    return life


def _moment(value: datetime | None) -> str | None:
    return None if value is None else format_datetime(value)


def row_disagreements(life: Lifecycle, row: Mapping[str, Any]) -> list[str]:
    """Where the catalog's `rollouts` row differs from what the chain says (empty: they agree)."""
    found: list[str] = []
    status = row.get("status")
    if life.status is None:
        if status not in NOT_STAGED:
            found.append(f"the catalog says {status}; the production audit chain has no rollout_staged event")
        elif row.get("staged_at") is not None or row.get("decision_hash") is not None:
            found.append("the catalog holds staged decisions; the production audit chain has none")
        return found
    if status != life.status:
        found.append(f"the catalog says {status}; the production audit chain says {life.status}")
    staged = life.staged
    if staged is None:  # cancelled or rolled back before it was ever staged
        return found
    expected = {
        "decision hash": staged.get("decision_hash"),
        "plan hash": staged.get("plan_hash"),
        "staged at": staged.get("staged_at"),
        "soak window (s)": staged.get("soak_window_seconds"),
    }
    actual = {
        "decision hash": row.get("decision_hash"),
        "plan hash": row.get("plan_hash"),
        "staged at": _moment(row.get("staged_at")),
        "soak window (s)": row.get("soak_window_seconds"),
    }
    for what, value in expected.items():
        if actual[what] != value:
            found.append(f"{what}: the catalog says {actual[what]}, the production audit chain {value}")
    try:
        subject = rollout_subject(row)
    except (KeyError, TypeError):
        subject = None
    if subject != staged.get("rollout"):
        found.append("the rollout's dataset, range or staging run differ from its rollout_staged event")
    return found


def soak_rows_on_chain(
    life: Lifecycle, rows: Iterable[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The catalog's `soak_evaluations` rows of the rollout split by the chain: those a
    `rollout_soak_evaluated` event of it records (same moment, verdict and detail digest), in their
    order, and one line for each other row (what `pcbo verify` reports; a soak report leaves it out)."""
    on_chain = Counter(_evaluation_key(e) for e in life.all_evaluations)
    recorded: list[Mapping[str, Any]] = []
    found = []
    for row in rows:
        key = _row_key(row)
        if on_chain[key] > 0:
            on_chain[key] -= 1
            recorded.append(row)
        else:
            verdict = "passed" if row.get("passed") else "failed"
            found.append(f"the evaluation at {key[0]} ({verdict}) is not on the production audit chain")
    return recorded, found


def soak_events_without_row(life: Lifecycle, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rollout's `rollout_soak_evaluated` events that no `soak_evaluations` row records (a crash
    between the event and its row), in chain order: `soak_rows_on_chain` the other way round."""
    held = Counter(_row_key(row) for row in rows)
    missing = []
    for event in life.all_evaluations:
        key = _evaluation_key(event)
        if held[key] > 0:
            held[key] -= 1
        else:
            missing.append(event)
    return missing


def soak_detail_of_event(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The evaluation's whole detail a `rollout_soak_evaluated` event carries (`detail_json`), when
    its digest is the event's `detail_digest` (what `pcbo verify --repair` writes a lost row from);
    None for an event without one (written before events carried it) or with another."""
    text = event.get("detail_json")
    if not isinstance(text, str):
        return None
    try:
        detail = json.loads(text)
        digest = detail_digest(detail)
    except (TypeError, ValueError):
        return None
    if not isinstance(detail, dict):
        return None
    return detail if digest == event.get("detail_digest") else None


def _evaluation_key(event: Mapping[str, Any]) -> tuple[Any, ...]:
    return event.get("evaluated_at"), event.get("passed"), event.get("detail_digest")


def _row_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    try:
        digest: str | None = detail_digest(row.get("detail"))
    except (TypeError, ValueError):
        digest = None
    return _moment(row.get("evaluated_at")), bool(row.get("passed")), digest


def approval_row_disagreements(
    events: Iterable[Mapping[str, Any]], name: str, rows: Iterable[Mapping[str, Any]]
) -> list[str]:
    """The catalog's `rollout_approvals` rows of rollout `name` that no `rollout_approved` /
    `rollout_rejected` event of the (verified) chain records, one line each: a row must name such an
    event of this rollout (each event once) and say what it says (decision, decision hash, approver,
    reason). Whether the event's signed statement counts is the gate's to judge (it holds the
    approvers' keys); a row alone never counts."""
    recorded = {
        event.get("chain", {}).get("event_hash"): event
        for event in events
        if event.get("event_type") in APPROVAL_EVENTS and of_rollout(event, name)
    }
    found = []
    for row in rows:
        event = recorded.pop(row.get("event_hash"), None)
        said = {"decision": "decision", "decision_hash": "decision_hash", "by": "actor", "reason": "reason"}
        if event is None or any(event.get(field) != row.get(column) for field, column in said.items()):
            found.append(
                f"row {row.get('id')}: {row.get('decision')} by {row.get('actor')} is not on the "
                "production audit chain"
            )
    return found


def approval_events_without_row(
    events: Iterable[Mapping[str, Any]], name: str, rows: Iterable[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """The `rollout_approved` / `rollout_rejected` events of rollout `name` on the (verified) chain
    that no `rollout_approvals` row names (by event hash), in chain order: the crash window of a
    decision (its event appended, its row not yet written; the rows are append-only)."""
    named = {row.get("event_hash") for row in rows}
    return [
        event
        for event in events
        if event.get("event_type") in APPROVAL_EVENTS
        and of_rollout(event, name)
        and event.get("chain", {}).get("event_hash") not in named
    ]


def row_catch_up(
    events: Iterable[Mapping[str, Any]], row: Mapping[str, Any], verifier: VerifierKey | None = None
) -> dict[str, Any] | None:
    """The crash window of a lifecycle step (its event on the chain, the `rollouts` row not yet
    written): when `row` disagrees with the rollout's lifecycle on the (verified) chain `events` but
    agrees exactly with the lifecycle before the rollout's last lifecycle event, the columns (`status`
    and, for a staging, the staged decisions, moment and staging run) that make it agree with the
    whole chain. None for any other disagreement (an edited row is a finding, never rewritten) or
    none at all."""
    chain = list(events)
    name = row.get("name")
    if not isinstance(name, str):
        return None
    life = lifecycle(chain, name, verifier)
    if life.status is None or not row_disagreements(life, row):
        return None
    last = max(
        (i for i, e in enumerate(chain) if e.get("event_type") in LIFECYCLE_EVENTS and of_rollout(e, name)),
        default=None,
    )
    if last is None:
        return None
    before = lifecycle(chain[:last], name, verifier)
    if row_disagreements(before, row):
        return None
    columns: dict[str, Any] = {"status": life.status}
    staged = life.staged
    if staged is not None and staged != before.staged:
        micros = parse_instant(staged.get("staged_at"))
        subject = staged.get("rollout")
        if micros is None or not isinstance(subject, Mapping):
            return None
        columns |= {
            "decision_hash": staged.get("decision_hash"),
            "plan_hash": staged.get("plan_hash"),
            "staged_at": to_datetime(micros),
            "staging_run_id": subject.get("staging_run_id"),
        }
    # Only a row that then agrees whole is caught up (its range and soak window are the event's).
    return None if row_disagreements(life, {**row, **columns}) else columns
