"""Evidence packages of a run: `pcbo evidence export --run R` and `pcbo evidence verify FILE --key K`.

A package is a DSSE envelope (`evidence/envelope.py`), payloadType `application/vnd.in-toto+json`,
signed with the operator's key, around an in-toto Statement v1 (its RFC 8785 bytes):

- `subject`: every parquet file the run's commits wrote and every version manifest, each
  `{name: <lake-relative path>, uri, digest: {sha256}}`;
- `predicateType`: `urn:pcbo_dagster:evidence:v1`; `predicate`: the run (id, dataset, version label,
  plan and decision hashes), counts by reason, the partitions (key, version, Merkle root, record
  count, manifest checksum, event hash, and the hash of the `partition_rolled_back` event that undid
  the version, or null), the run's audit events (its commits and intents, rollbacks,
  restorations, and the promotion and approval events naming it) each with an RFC 6962 inclusion
  proof against the signed checkpoint the package carries (`checkpoint`, with its witness
  cosignatures), and the approvals.

Every claim besides the checkpoint and the events is derived from the events alone (`claims_of`):
export writes what they say, and verify recomputes it from the events whose inclusion it proved and
refuses a package that says anything else, or more (an insider re-signing the envelope with the
operator's key can add no claim the log does not carry). What no event carries is not in a package:
the run's status (the catalog's), and its policies (in each version manifest, a subject: read them
from the lake, whose bytes `--lake` checks).

Verification needs no catalog and no lake: the envelope's signature, the checkpoint's signature (same
key) and origin (exactly the log of the run's chain), each event's hash and inclusion proof, that the
events are the run's (and the approvals its promotion relied on), every intent's partitions completed
by the package's events and every completion announced by an intent, and the claims. With a lake
(`--lake URL`) every subject's bytes are read and their SHA-256 compared (a data file only rolled-back
versions name may be absent: their proven rollback removed it). The operator's key alone
signs anything an insider holding it wants (another history, under the real origin, included): only
cosignatures of witnesses the verifier trusts (`--witness-key`, `--min-witnesses N`), which never
cosign a history inconsistent with the one they saw, bind the package to the log everyone else sees.
Each event's operator signature (`core/operator_signatures.py`) is checked under the verifier's key
too (`_event_signature_problems`): a checkpoint the key signed vouches for an event's place in the log,
its signature for who appended it. A package does not prove that the log holds no other event of the
run: an omitted intent with all its commits leaves no trace in it (`pcbo verify --trusted-checkpoint`
checks the whole chain).

The approval notes a package carries are checked only against approvers' keys the verifier trusts
(`--approver-key`): each approval the run's promotion relied on must pass the rollout gate's own check
(`approval_of_event`: its note verifies under one of those keys and names the rollout, decision,
decision hash and signer its event names) and approve the rollout and decision hash that promotion
promoted. The operator's key signs approval events onto the log, never the notes in them. A promotion
names every approval the gate counted (`approval_event_hashes`; one written before 2026-12-06 names
the last alone, `approval_event_hash`), and the package carries each. `--min-approvals N` counts,
per promotion, the distinct trusted keys its approvals verified under (one key counts once, under
any name and however often it is named): fewer than N, or no promotion in the package, is invalid.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from pcbo_dagster.core.audit_chain import split_chain_key
from pcbo_dagster.core.canonical import CanonicalizationError, jcs
from pcbo_dagster.core.chain_state import (
    PARTITION_COMMIT_INTENT,
    PARTITION_COMMITTED,
    PARTITION_ROLLBACK_INTENT,
    PARTITION_ROLLED_BACK,
)
from pcbo_dagster.core.checkpoints import (
    DEFAULT_ORIGIN_PREFIX,
    CheckpointError,
    chain_of_origin,
    origin_for,
    parse_signed_checkpoint,
)
from pcbo_dagster.core.errors import IntegrityError, InvalidInput
from pcbo_dagster.core.operator_signatures import OPERATOR_SIGNATURE, unsigned_events, verified_statement
from pcbo_dagster.core.request_model import NAME_PATTERN, parse_json_strict
from pcbo_dagster.core.rollout_lifecycle import SELF_CHECKED_EVENTS
from pcbo_dagster.core.signed_approvals import APPROVAL_EVENTS, ROLLOUT_APPROVED, approval_of_event
from pcbo_dagster.core.signed_note import (
    NoteError,
    VerifierKey,
    b64,
    parse_verifier_key,
    verify_cosignatures,
    verify_note,
)
from pcbo_dagster.core.transparency_log import event_inclusion_problems
from pcbo_dagster.evidence.envelope import EnvelopeError, open_envelope, sign_envelope
from pcbo_dagster.lake import layout

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:pcbo_dagster:evidence:v1"
#: `rollout/promotion.py`'s event type (not imported: an offline verifier would load the whole engine
#: with it).
ROLLOUT_PROMOTED = "rollout_promoted"
STATEMENT_FIELDS = {"_type", "subject", "predicateType", "predicate"}
#: The predicate's members: the claims `claims_of` derives, the checkpoint and the events.
CLAIMS = ("run", "countsByReason", "partitions", "approvals")
PREDICATE_FIELDS = {*CLAIMS, "checkpoint", "auditEvents"}
AUDIT_EVENT_FIELDS = {"event", "leafIndex", "treeSize", "inclusionProof"}
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")


class ClaimError(ValueError):
    """Events that cannot support a package's claims (not of the shape pcbo writes, or disagreeing)."""


def _named_approvals(promotion: Mapping[str, Any]) -> list[Any]:
    """The approval events a promotion event names, as written, each once: its `approval_event_hashes`
    (every approval the gate counted, in chain order) and its `approval_event_hash` (the last of them;
    the only one a promotion written before 2026-12-06 names). Values that are no hash (a list, an
    object: an insider's) are kept, and told apart by their RFC 8785 form, never hashed themselves."""
    listed = promotion.get("approval_event_hashes")
    named = list(listed) if isinstance(listed, list) else ([] if listed is None else [listed])
    if promotion.get("approval_event_hash") is not None:
        named.append(promotion["approval_event_hash"])
    return list({jcs(value): value for value in named}.values())


def _relied_approvals(events: list[dict]) -> list[Any]:
    """Every approval event a promotion event of `events` names (`_named_approvals`)."""
    promotions = [e for e in events if e.get("event_type") == ROLLOUT_PROMOTED]
    return [value for promotion in promotions for value in _named_approvals(promotion)]


def _run_events(events: list[dict], run_id: str) -> list[dict]:
    """The run's events, and the approval events its promotions relied on, in chain order."""
    relied = {
        h for h in _relied_approvals([e for e in events if e.get("run_id") == run_id]) if isinstance(h, str)
    }
    return [
        e
        for e in events
        if e.get("run_id") == run_id
        or (e.get("event_type") in APPROVAL_EVENTS and e["chain"]["event_hash"] in relied)
    ]


def _subject(name: str, uri: Any, checksum: Any) -> dict[str, Any]:
    """A subject: `uri` must be the lake's URI of `name` (it ends with `/<name>`), `checksum` a
    `sha256:<hex>`."""
    digest = _SHA256.fullmatch(checksum) if isinstance(checksum, str) else None
    if not isinstance(uri, str) or not uri.endswith("/" + name) or digest is None:
        raise ClaimError(f"{name}: its event names no lake URI of it or no sha256 ({uri!r}, {checksum!r})")
    return {"name": name, "uri": uri, "digest": {"sha256": digest.group(1)}}


def _one_value(events: list[dict], field: str) -> Any:
    """The one value of `field` the events carrying it agree on (None when none carries it)."""
    values = {jcs(e[field]): e[field] for e in events if e.get(field) is not None}
    if len(values) > 1:
        raise ClaimError(f"the run's events name {len(values)} different {field} values")
    return next(iter(values.values()), None)


def _count(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ClaimError(f"{where}: not a count")
    return value


def claims_of(events: list[dict], run_id: str, dataset: str, version_label: str) -> dict[str, Any]:
    """Every claim of the package of run `run_id` of chain `<dataset>/<versionLabel>` besides its
    checkpoint and events, from `events` alone (the run's, and the approvals its promotion relied on,
    in chain order): `{"subject", "run", "countsByReason", "partitions", "approvals"}`. What export
    writes and verify recomputes from the proven events. `ClaimError` when the events cannot say."""
    own = [e for e in events if e.get("run_id") == run_id]
    subjects: dict[str, dict[str, Any]] = {}
    named_by: dict[str, list[tuple[str, int]]] = {}
    partitions: list[dict[str, Any]] = []
    committed: set[tuple[str, int]] = set()  # (key, version) of each commit event read
    by_reason: dict[str, int] = {}
    try:
        undone = _undone_versions(own)
        for event in own:
            if event.get("event_type") != PARTITION_COMMITTED:
                continue
            part = event["partition"]
            key, version = part["key"], part["version"]
            layout.check_partition(dataset, version_label, key)
            if type(version) is not int:
                raise ClaimError(f"partition {key}: its version is not a number")
            if (part["dataset"], part["version_label"]) != (dataset, version_label):
                raise ClaimError(f"partition {key}: its commit event is of another dataset version")
            if (key, version) in committed:
                raise ClaimError(f"partition {key} version {version}: two commit events")
            committed.add((key, version))
            named = [
                _subject(
                    layout.data_file_path(
                        dataset,
                        version_label,
                        key,
                        f"{layout.partition_dir(dataset, version_label, key)}/{n}",
                    ),
                    table["storage_path"],
                    table["checksum"],
                )
                for n, table in sorted(event["tables"].items())
            ]
            named.append(
                _subject(
                    layout.version_manifest(dataset, version_label, key, version),
                    event["manifest"]["version_uri"],
                    event["manifest"]["checksum"],
                )
            )
            for subject in named:
                if subjects.setdefault(subject["name"], subject) != subject:
                    raise ClaimError(f"{subject['name']}: two commit events give it different digests")
            for subject in named[:-1]:  # the data files (a rollback removes them, never a manifest)
                named_by.setdefault(subject["name"], []).append((key, version))
            for reason, count in sorted(event["counts"]["by_reason"].items()):
                by_reason[reason] = by_reason.get(reason, 0) + _count(count, f"partition {key} {reason}")
            partitions.append(
                {
                    "key": key,
                    "version": version,
                    "merkleRoot": event["merkle_root"],
                    "recordCount": _count(event["record_count"], f"partition {key} record_count"),
                    "manifestChecksum": event["manifest"]["checksum"],
                    "eventHash": event["chain"]["event_hash"],
                    "rolledBack": undone.get((key, version, event["manifest"]["checksum"])),
                }
            )
        approvals = [
            {k: e.get(k) for k in ("event_type", "rollout", "decision", "decision_hash", "by", "reason")}
            | {"eventHash": e["chain"]["event_hash"], "signedApproval": e.get("signed_approval")}
            for e in events
            if e.get("event_type") in APPROVAL_EVENTS
        ]
        run = {
            "runId": run_id,
            "dataset": dataset,
            "versionLabel": version_label,
            "planHash": _one_value(own, "plan_hash"),
            "decisionHash": _one_value(own, "decision_hash"),
        }
    except ClaimError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, CanonicalizationError) as exc:
        raise ClaimError(f"an event of the run is not of the shape pcbo writes: {exc!r}") from None
    rolled_back = {(p["key"], p["version"]) for p in partitions if p["rolledBack"] is not None}
    return {
        "subject": [subjects[name] for name in sorted(subjects)],
        "run": run,
        "countsByReason": dict(sorted(by_reason.items())),
        "partitions": partitions,
        "approvals": approvals,
        # Not a claim: the data files only rolled-back versions name (a rollback removes them; their
        # version manifests stay, and must be there).
        "rolledBackSubjects": sorted(n for n, vs in named_by.items() if set(vs) <= rolled_back),
    }


def _undone_versions(own: list[dict]) -> dict[tuple[Any, Any, Any], str]:
    """The event hash of each `partition_rolled_back` of the run's events, by the (key, version,
    manifest checksum) of the version it undid."""
    undone: dict[tuple[Any, Any, Any], str] = {}
    for event in own:
        if event.get("event_type") == PARTITION_ROLLED_BACK:
            part = event["partition"]
            undone[(part["key"], part["version"], event["undone_manifest_checksum"])] = event["chain"][
                "event_hash"
            ]
    return undone


def _fields(value: Any, *names: str) -> tuple[Any, ...]:
    """`value`'s members `names` (None for each when it is no JSON object)."""
    return tuple(value.get(n) for n in names) if isinstance(value, Mapping) else (None,) * len(names)


def _completion_problems(events: list[dict]) -> list[str]:
    """Every partition an intent of the package names completed by a later event of the package, and
    every completion announced by an earlier intent: a commit (or a rollback) left out shows. Matched
    by the RFC 8785 form of (key, version, manifest checksum), so each check is one look-up."""
    problems: list[str] = []
    pairs = (
        (PARTITION_COMMIT_INTENT, PARTITION_COMMITTED, "commit"),
        (PARTITION_ROLLBACK_INTENT, PARTITION_ROLLED_BACK, "rollback"),
    )
    for intent_type, completion_type, what in pairs:
        announced: list[tuple[int, tuple[Any, ...], bytes]] = []  # (seq, named, its RFC 8785 form)
        completed: list[tuple[int, tuple[Any, ...], bytes]] = []
        for event in events:
            seq = event["chain"]["seq"]
            if event.get("event_type") == intent_type:
                entries = event.get("partitions")
                for entry in entries if isinstance(entries, list) and entries else [None]:
                    named = _fields(entry, "key", "version", "manifest_checksum")
                    announced.append((seq, named, jcs(named)))
            elif event.get("event_type") == completion_type:
                key_version = _fields(event.get("partition"), "key", "version")
                if what == "commit":
                    checksum = _fields(event.get("manifest"), "checksum")
                else:
                    checksum = _fields(event, "undone_manifest_checksum")
                named = key_version + checksum
                completed.append((seq, named, jcs(named)))
        first_announced: dict[bytes, int] = {}
        for seq, _, form in announced:
            first_announced[form] = min(seq, first_announced.get(form, seq))
        last_completed: dict[bytes, int] = {}
        for seq, _, form in completed:
            last_completed[form] = max(seq, last_completed.get(form, seq))
        for seq, named, form in announced:
            if last_completed.get(form, seq) <= seq:
                problems.append(
                    f"partition {named[0]} version {named[1]}: named by the {what} intent of seq {seq}, "
                    f"and no {what} of it follows in the package"
                )
        for seq, named, form in completed:
            if first_announced.get(form, seq) >= seq:
                problems.append(
                    f"partition {named[0]} version {named[1]}: the {what} of seq {seq} follows no intent "
                    "in the package"
                )
    return problems


def export(env: Any, run_id: str) -> dict[str, Any]:
    """The signed evidence package of `run_id` (module doc)."""
    from pcbo_dagster.engine.partition_checks import verified_chain
    from pcbo_dagster.engine.transparency_log import full_note, latest_stored_checkpoint, publish

    if env.signing_key is None:
        raise InvalidInput(
            "--signing-key", "an evidence package is signed with the operator's key (PCBO_SIGNING_KEY)"
        )
    run = env.catalog.get_run(run_id)
    if run is None:
        raise InvalidInput("--run", f"no run {run_id!r} in the catalog")
    chain_key = f"{run['dataset']}/{run['version_label']}"
    # the claims the operator's key signs come from a chain that verifies, never the backup as it lies
    events = verified_chain(
        env, run["dataset"], run["version_label"], f"the evidence package of run {run_id}", sync=False
    ).events
    chosen = _run_events(events, run_id)
    if not chosen:
        raise InvalidInput("--run", f"no audit event of {chain_key} names run {run_id!r}")
    try:
        claims = claims_of(chosen, run_id, run["dataset"], run["version_label"])
    except ClaimError as exc:
        raise IntegrityError(
            f"run {run_id}: its audit events cannot make an evidence package: {exc}"
        ) from None
    last_seq = max(e["chain"]["seq"] for e in chosen)
    latest = latest_stored_checkpoint(env.catalog, chain_key)
    if latest is None or latest["tree_size"] <= last_seq:
        publish(env, chain_key)
        latest = latest_stored_checkpoint(env.catalog, chain_key)
    assert latest is not None
    size = latest["tree_size"]
    with env.catalog.log_reader(chain_key) as reader:
        proofs = {
            e["chain"]["seq"]: [b64(h) for h in reader.inclusion_proof(e["chain"]["seq"], size)]
            for e in chosen
        }
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": claims["subject"],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            **{name: claims[name] for name in CLAIMS},
            "checkpoint": full_note(latest).render(),
            "auditEvents": [
                {
                    "event": e,
                    "leafIndex": e["chain"]["seq"],
                    "treeSize": size,
                    "inclusionProof": proofs[e["chain"]["seq"]],
                }
                for e in chosen
            ],
        },
    }
    return sign_envelope(jcs(statement), env.signing_key)


def _read_payload(payload: bytes) -> tuple[Any, str | None]:
    """The statement a signed payload holds, or why it holds none: the payload must be exactly the
    RFC 8785 bytes of one JSON value, so every reader sees the same statement (no duplicate member that
    one parser takes first and another last, no second encoding of the same statement)."""
    try:
        statement = parse_json_strict(payload, what="the payload").value
        canonical = jcs(statement) == payload
    except InvalidInput as exc:
        return None, f"the payload: {exc.message}"
    except CanonicalizationError as exc:
        return None, f"the payload has no RFC 8785 form: {exc}"
    if not canonical:
        return None, "the payload is not the RFC 8785 canonical form of its JSON"
    return statement, None


def verify(
    document: Any,
    key: VerifierKey,
    lake: Any = None,
    witness_keys: list[VerifierKey] | None = None,
    min_witnesses: int = 0,
    origin_prefix: str = DEFAULT_ORIGIN_PREFIX,
    approver_keys: list[VerifierKey] | None = None,
    min_approvals: int = 0,
    signed_events: bool = False,
) -> dict[str, Any]:
    """Check a package offline (module doc); `{"valid", "problems", ...}`. `lake`: a `LakeStorage`
    whose subjects' bytes are checked too. The checkpoint's origin must be exactly the log of the run's
    chain under `origin_prefix`, and carry at least `min_witnesses` cosignatures of `witness_keys`.
    `approver_keys` (None: not checked): the approvers' keys the verifier trusts; every approval the
    run's promotions relied on must be signed by one of them (`_checked_approvals`), and with
    `min_approvals` N (0: not counted) the package must hold a promotion, and each of its promotions
    name approvals that verify under N distinct keys of them (`_too_few_approvers`). The events'
    operator signatures are checked under `key` (`_event_signature_problems`; `signed_events`: every
    event must carry one)."""
    problems: list[str] = []
    try:
        payload = open_envelope(document, key)
    except EnvelopeError as exc:
        return {"valid": False, "problems": [str(exc)]}
    statement, problem = _read_payload(payload)
    if problem is not None:
        return {"valid": False, "problems": [problem]}
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        return {
            "valid": False,
            "problems": [f"the payload is not an in-toto Statement v1 ({STATEMENT_TYPE})"],
        }
    if statement.get("predicateType") != PREDICATE_TYPE or not isinstance(statement.get("predicate"), dict):
        return {"valid": False, "problems": [f"the predicate is not {PREDICATE_TYPE}"]}
    predicate = statement["predicate"]
    extra = sorted(set(statement) - STATEMENT_FIELDS) + sorted(set(predicate) - PREDICATE_FIELDS)
    if extra:
        problems.append(f"the statement holds members no event supports: {', '.join(extra)}")
    run = predicate.get("run")
    run_id, dataset, version_label = _fields(run, "runId", "dataset", "versionLabel")
    chain_key = f"{dataset}/{version_label}"
    try:
        if not isinstance(run_id, str) or not isinstance(dataset, str) or not isinstance(version_label, str):
            raise ValueError(run)
        if not re.fullmatch(NAME_PATTERN, run_id):  # a run id pcbo writes (`export --run` takes no other)
            raise ValueError(run_id)
        split_chain_key(chain_key)
    except ValueError:
        return {"valid": False, "problems": ["the predicate names no run (runId, dataset, versionLabel)"]}
    try:
        checkpoint, note = parse_signed_checkpoint(predicate.get("checkpoint") or "")
        verify_note(note, [key])
        cosigned = verify_cosignatures(note, witness_keys or [])
    except (CheckpointError, NoteError) as exc:
        return {"valid": False, "problems": [f"the package's checkpoint: {exc}"]}
    if chain_of_origin(checkpoint.origin, origin_prefix) != chain_key:
        problems.append(
            f"the checkpoint's origin {checkpoint.origin} is not the log of {chain_key} "
            f"({origin_for(chain_key, origin_prefix)})"
        )
    if len(cosigned) < min_witnesses:
        problems.append(
            f"{len(cosigned)} of the {min_witnesses} witness cosignature(s) required verify on the checkpoint"
        )
    entries = predicate.get("auditEvents")
    proven, event_problems = _proven_events(
        entries if isinstance(entries, list) else [], chain_key, checkpoint
    )
    problems += event_problems
    signed, signature_problems = _event_signature_problems(proven, key, signed_events)
    problems += signature_problems
    if not any(e.get("run_id") == run_id for e in proven):
        problems.append(f"the package holds no proven event of run {run_id}")
    elif _run_events(proven, run_id) != proven:
        problems.append(
            f"the package holds events that are neither run {run_id}'s nor approvals it relied on"
        )
    proven_hashes = {e["chain"]["event_hash"] for e in proven}
    if any(not isinstance(h, str) or h not in proven_hashes for h in _relied_approvals(proven)):
        problems.append("the package lacks an approval event the run's promotion relied on")
    problems += _completion_problems(proven)
    approvals = promotions = None
    if approver_keys is not None or min_approvals:
        approvals, promotions = _checked_approvals(proven, approver_keys or [])
        problems += [a["problem"] for a in approvals if a["problem"] is not None]
        problems += _too_few_approvers(promotions, run_id, min_approvals)
    subjects: list[dict[str, Any]] = []
    rolled_back: set[str] = set()
    try:
        claims = claims_of(proven, run_id, dataset, version_label)
    except ClaimError as exc:
        problems.append(f"the proven events support no claims: {exc}")
    else:
        subjects, rolled_back = claims["subject"], set(claims["rolledBackSubjects"])
        if statement.get("subject") != subjects:
            problems.append(
                "the subjects are not exactly the files and manifests the run's proven commit events name"
            )
        for name in CLAIMS:
            if predicate.get(name) != claims[name]:
                problems.append(f"the predicate's {name} is not what the run's proven events say")
    checked = absent = 0
    if lake is not None:
        for subject in subjects:
            name, digest = subject["name"], subject["digest"]["sha256"]
            data = lake.read_if_exists(name)
            if data is None and name in rolled_back:
                absent += 1  # its version's rollback, a proven event of the package, removed it
            elif data is None:
                problems.append(f"{name}: missing from the lake")
            elif hashlib.sha256(data).hexdigest() != digest:
                problems.append(f"{name}: its bytes do not have the subject's sha256")
            else:
                checked += 1
    listed = statement.get("subject")
    return {
        "valid": not problems,
        "problems": problems,
        "run": run,
        "checkpoint": {
            "origin": checkpoint.origin,
            "treeSize": checkpoint.size,
            "witnesses": len(cosigned),
            "witnessedBy": sorted(parse_verifier_key(k).name for k in cosigned),
        },
        "subjects": len(listed) if isinstance(listed, list) else 0,
        "subjectsCheckedInLake": checked if lake is not None else None,
        "subjectsRolledBackFromLake": absent if lake is not None else None,
        "auditEvents": len(entries) if isinstance(entries, list) else 0,
        "signedEvents": signed,
        "approvals": approvals,
        "promotions": promotions,
    }


def _checked_approvals(
    proven: list[dict], approver_keys: list[VerifierKey]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each proven approval event a promotion of `proven` relied on, checked as the rollout gate checks
    one (`approval_of_event`: its note verifies under one of `approver_keys` and says what its event
    says), and an approval of the rollout and decision hash each promotion relying on it promoted:
    `{eventHash, verified, approver, approverKey, problem}` (the approver's key name and vkey when it
    verified; else the problem). And each promotion of `proven`, with the distinct trusted approvers'
    keys its approvals verified under: `{eventHash, rollout, decisionHash, approvalsNamed, approvers,
    distinctApprovers}` (one key counts once, whatever its name and however many of its approvals
    the promotion names)."""
    promotions = [(p, _named_approvals(p)) for p in proven if p.get("event_type") == ROLLOUT_PROMOTED]
    named_by: dict[str, list[dict]] = {}  # the promotions naming each approval event hash
    for promotion, named in promotions:
        for value in named:
            if isinstance(value, str):
                named_by.setdefault(value, []).append(promotion)
    checked: list[dict[str, Any]] = []
    verified_under: dict[str, VerifierKey] = {}  # by approval event hash
    for event in proven:
        event_hash = event["chain"]["event_hash"]
        if event.get("event_type") not in APPROVAL_EVENTS or event_hash not in named_by:
            continue
        signer: VerifierKey | None = None
        problem = None
        try:
            signed = approval_of_event(event, approver_keys)
        except NoteError as exc:
            problem = f"is not a signed approval of a trusted --approver-key: {exc}"
        else:
            # a list (not a set): what an insider wrote there may be a list or an object
            promoted = [
                (_fields(p.get("rollout"), "name")[0], p.get("decision_hash")) for p in named_by[event_hash]
            ]
            if event.get("event_type") != ROLLOUT_APPROVED:
                problem = f"is a rejection signed by {signed.signer.name}, not an approval"
            elif any(pair != (signed.rollout, signed.decision_hash) for pair in promoted):
                problem = (
                    f"approves rollout {signed.rollout!r} decision hash {signed.decision_hash}, not what "
                    f"the promotion relying on it promoted ({', '.join(sorted({repr(p) for p in promoted}))})"
                )
            else:
                signer = verified_under[event_hash] = signed.signer
        checked.append(
            {
                "eventHash": event_hash,
                "verified": signer is not None,
                "approver": None if signer is None else signer.name,
                "approverKey": None if signer is None else signer.text,
                "problem": None
                if problem is None
                else f"the approval {event_hash} the run's promotion relied on {problem}",
            }
        )
    counted: list[dict[str, Any]] = []
    for promotion, named in promotions:
        keys = {
            verified_under[h].public_key: verified_under[h].name
            for h in named
            if isinstance(h, str) and h in verified_under
        }
        counted.append(
            {
                "eventHash": promotion["chain"]["event_hash"],
                "rollout": _fields(promotion.get("rollout"), "name")[0],
                "decisionHash": promotion.get("decision_hash"),
                "approvalsNamed": len(named),
                "approvers": sorted(keys.values()),
                "distinctApprovers": len(keys),
            }
        )
    return checked, counted


def _too_few_approvers(promotions: list[dict[str, Any]], run_id: str, min_approvals: int) -> list[str]:
    """Why the package does not show `min_approvals` distinct trusted approvers approving each promotion
    of the run (`_checked_approvals`' promotions; empty: it does, or nothing is asked)."""
    if not min_approvals:
        return []
    if not promotions:
        return [
            f"the package holds no promotion of run {run_id}: nothing in it shows the {min_approvals} "
            "approver(s) --min-approvals requires"
        ]
    return [
        f"the promotion {p['eventHash']} of rollout {p['rollout']!r} names approvals that verify under "
        f"{p['distinctApprovers']} distinct trusted --approver-key(s), not the {min_approvals} "
        "--min-approvals requires"
        for p in promotions
        if p["distinctApprovers"] < min_approvals
    ]


def _event_signature_problems(proven: list[dict], key: VerifierKey, every: bool) -> tuple[int, list[str]]:
    """How many of the `proven` events carry the operator's signature at their place (verified under
    `key`: `core/operator_signatures.py`), and why the others do not count: a signature that does not
    verify (another key's, or one made for another event or place), and, from the first event the key
    signed on (`every`: from the first event), an event with none other than those whose readers check
    their own signatures (`SELF_CHECKED_EVENTS`: approvals carry the approver's). The checkpoint the key
    signed vouches for the events' place in the log, not for who appended them: someone who can write
    the stores but holds no key appended an event a checkpoint signed before 2026-12-07 may cover."""
    problems: list[str] = []
    signed = 0
    for event in proven:  # (each signature verified once)
        if verified_statement(event, key) is not None:
            signed += 1
        elif OPERATOR_SIGNATURE in event:
            problems.append(
                f"event seq {event['chain']['seq']}: its operator_signature does not verify under the "
                f"operator's key {key.name} at its place (signed by another key, or for another event)"
            )
    for bare in unsigned_events(proven, key, every, SELF_CHECKED_EVENTS):
        if OPERATOR_SIGNATURE not in bare:
            problems.append(f"event seq {bare['chain']['seq']} carries no signature of the operator's key")
    return signed, problems


def _proven_events(entries: list[Any], chain_key: str, checkpoint: Any) -> tuple[list[dict], list[str]]:
    """The events of `entries` whose inclusion in the checkpoint's log verifies (each listed as its own
    leaf, of chain `chain_key`, in strictly rising seq order), and why the others do not count."""
    proven: list[dict] = []
    problems: list[str] = []
    for entry in entries:
        event = entry.get("event") if isinstance(entry, dict) else None
        proof = entry.get("inclusionProof") if isinstance(entry, dict) else None
        if not isinstance(event, dict) or not isinstance(proof, list) or set(entry) != AUDIT_EVENT_FIELDS:
            problems.append(f"an audit event entry is not {{{', '.join(sorted(AUDIT_EVENT_FIELDS))}}}")
            continue
        found = event_inclusion_problems(event, checkpoint.size, proof, checkpoint)
        if found:
            problems += found
            continue
        seq = event["chain"]["seq"]
        if type(entry["treeSize"]) is not int or entry["treeSize"] != checkpoint.size:
            found.append(f"event seq {seq}: proved against another size than the checkpoint's")
        if type(entry["leafIndex"]) is not int or entry["leafIndex"] != seq:
            found.append(f"event seq {seq}: listed as leaf {entry['leafIndex']!r}")
        if event["chain"].get("chain_key") != chain_key:
            found.append(f"event seq {seq} is not of chain {chain_key}")
        if proven and seq <= proven[-1]["chain"]["seq"]:
            found.append(f"event seq {seq}: not after the event before it (chain order, each once)")
        if found:
            problems += found
        else:
            proven.append(event)
    return proven, problems


def write_evidence_file(env: Any, run_id: str) -> tuple[str, str]:
    """Export the run's package to `$PCBO_HOME/evidence/<run id>.evidence.json` (replaced whole);
    (its path, `sha256:<hex>` of its bytes). What a Dagster materialization records as metadata."""
    from pcbo_dagster.core.json_documents import sorted_document
    from pcbo_dagster.io.atomic_files import replace_file

    data = sorted_document(export(env, run_id))
    path = env.settings.home / "evidence" / f"{run_id}.evidence.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(str(path), data, durable=True)
    return str(path), "sha256:" + hashlib.sha256(data).hexdigest()
