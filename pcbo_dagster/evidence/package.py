"""Evidence packages of a run: `pcbo evidence export --run R` and `pcbo evidence verify FILE --key K`.

A package is a DSSE envelope (`evidence/envelope.py`), payloadType `application/vnd.in-toto+json`,
signed with the operator's key, around an in-toto Statement v1:

- `subject`: every parquet file the run's commits wrote and every version manifest, each
  `{name: <lake-relative path>, uri, digest: {sha256}}`;
- `predicateType`: `urn:pcbo_dagster:evidence:v1`; `predicate`: the run (id, dataset, version label,
  plan and decision hashes), the policies (from the run's first committed manifest), counts by
  reason, the partitions (key, version, Merkle root, record count, manifest checksum, event hash),
  the run's audit events (its commits and intents, rollbacks, restorations, and the promotion and
  approval events naming it) each with an RFC 6962 inclusion proof against the signed checkpoint
  the package carries (`checkpoint`, with its witness cosignatures), and the approvals.

Verification needs no catalog and no lake: the envelope's signature, the checkpoint's signature (same
key) and origin (exactly the log of the run's chain), each event's hash and inclusion proof, and that
the subjects, partitions and events say the same things. With a lake (`--lake URL`) every subject's
bytes are read and their SHA-256 compared. The operator's key alone signs anything an insider holding
it wants (another history, under the real origin, included): only cosignatures of witnesses the
verifier trusts (`--witness-key`, `--min-witnesses N`), which never cosign a history inconsistent with
the one they saw, bind the package to the log everyone else sees.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pcbo_dagster.core.canonical import CanonicalizationError, jcs
from pcbo_dagster.core.chain_state import (
    PARTITION_COMMITTED,
)
from pcbo_dagster.core.checkpoints import (
    DEFAULT_ORIGIN_PREFIX,
    CheckpointError,
    chain_of_origin,
    origin_for,
    parse_signed_checkpoint,
)
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.request_model import parse_json_strict
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
from pcbo_dagster.lake import layout, manifests

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:pcbo_dagster:evidence:v1"
APPROVAL_EVENTS = ("rollout_approved", "rollout_rejected")


def _run_events(events: list[dict], run_id: str) -> list[dict]:
    """The run's events, and the approval events its promotion relied on, in chain order."""
    own = [e for e in events if e.get("run_id") == run_id]
    relied = {e.get("approval_event_hash") for e in own if e.get("event_type") == "rollout_promoted"}
    return [e for e in events if e in own or e.get("chain", {}).get("event_hash") in relied]


def export(env: Any, run_id: str) -> dict[str, Any]:
    """The signed evidence package of `run_id` (module doc)."""
    from pcbo_dagster.engine.transparency_log import full_note, publish

    if env.signing_key is None:
        raise InvalidInput(
            "--signing-key", "an evidence package is signed with the operator's key (PCBO_SIGNING_KEY)"
        )
    run = env.catalog.get_run(run_id)
    if run is None:
        raise InvalidInput("--run", f"no run {run_id!r} in the catalog")
    chain_key = f"{run['dataset']}/{run['version_label']}"
    events = env.audit.backup.read_chain(chain_key)
    chosen = _run_events(events, run_id)
    if not chosen:
        raise InvalidInput("--run", f"no audit event of {chain_key} names run {run_id!r}")
    last_seq = max(e["chain"]["seq"] for e in chosen)
    latest = env.catalog.latest_checkpoint(chain_key)
    if latest is None or latest["tree_size"] <= last_seq:
        publish(env, chain_key)
        latest = env.catalog.latest_checkpoint(chain_key)
    assert latest is not None
    size = latest["tree_size"]
    with env.catalog.log_reader(chain_key) as reader:
        proofs = {
            e["chain"]["seq"]: [b64(h) for h in reader.inclusion_proof(e["chain"]["seq"], size)]
            for e in chosen
        }
    subjects: dict[str, dict[str, Any]] = {}
    partitions: list[dict[str, Any]] = []
    by_reason: dict[str, int] = {}
    policies = None
    for event in chosen:
        if event.get("event_type") != PARTITION_COMMITTED:
            continue
        part = event["partition"]
        key, version = part["key"], part["version"]
        base = layout.partition_dir(run["dataset"], run["version_label"], key)
        for name, table in sorted(event["tables"].items()):
            subjects[f"{base}/{name}"] = {
                "name": f"{base}/{name}",
                "uri": table["storage_path"],
                "digest": {"sha256": table["checksum"].removeprefix("sha256:")},
            }
        manifest_rel = layout.version_manifest(run["dataset"], run["version_label"], key, version)
        subjects[manifest_rel] = {
            "name": manifest_rel,
            "uri": event["manifest"]["version_uri"],
            "digest": {"sha256": event["manifest"]["checksum"].removeprefix("sha256:")},
        }
        if policies is None:
            data = env.lake.read_if_exists(manifest_rel)
            if data is not None and manifests.checksum(data) == event["manifest"]["checksum"]:
                policies = manifests.decode(data).get("policies")
        for reason, count in event["counts"]["by_reason"].items():
            by_reason[reason] = by_reason.get(reason, 0) + count
        partitions.append(
            {
                "key": key,
                "version": version,
                "merkleRoot": event["merkle_root"],
                "recordCount": event["record_count"],
                "manifestChecksum": event["manifest"]["checksum"],
                "eventHash": event["chain"]["event_hash"],
            }
        )
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [subjects[name] for name in sorted(subjects)],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "run": {
                "runId": run_id,
                "dataset": run["dataset"],
                "versionLabel": run["version_label"],
                "planHash": run["plan_hash"],
                "decisionHash": run["decision_hash"],
                "status": run["status"],
            },
            "policies": policies,
            "countsByReason": dict(sorted(by_reason.items())),
            "partitions": partitions,
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
            "approvals": [
                {k: e.get(k) for k in ("event_type", "rollout", "decision", "decision_hash", "by", "reason")}
                | {"eventHash": e["chain"]["event_hash"], "signedApproval": e.get("signed_approval")}
                for e in chosen
                if e.get("event_type") in APPROVAL_EVENTS
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
) -> dict[str, Any]:
    """Check a package offline (module doc); `{"valid", "problems", ...}`. `lake`: a `LakeStorage`
    whose subjects' bytes are checked too. The checkpoint's origin must be exactly the log of the run's
    chain under `origin_prefix`, and carry at least `min_witnesses` cosignatures of `witness_keys`."""
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
    run = predicate.get("run") or {}
    dataset, version_label = str(run.get("dataset")), str(run.get("versionLabel"))
    chain_key = f"{dataset}/{version_label}"
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
    committed: dict[tuple[str, int], dict] = {}
    for entry in predicate.get("auditEvents") or []:
        event = entry.get("event") if isinstance(entry, dict) else None
        if not isinstance(event, dict):
            problems.append("an audit event entry holds no event")
            continue
        if entry.get("treeSize") != checkpoint.size:
            problems.append(
                f"event seq {entry.get('leafIndex')}: proved against another size than the checkpoint's"
            )
        problems += event_inclusion_problems(
            event, checkpoint.size, list(entry.get("inclusionProof") or []), checkpoint
        )
        if event.get("chain", {}).get("chain_key") != chain_key:
            problems.append(f"event seq {entry.get('leafIndex')} is not of chain {chain_key}")
        if event.get("event_type") == PARTITION_COMMITTED and isinstance(event.get("partition"), dict):
            committed[(event["partition"].get("key"), event["partition"].get("version"))] = event
    subjects = {s.get("name"): s for s in statement.get("subject") or [] if isinstance(s, dict)}
    expected: dict[str, str] = {}
    for (key_, version), event in committed.items():
        base = layout.partition_dir(dataset, version_label, str(key_))
        for name, table in (event.get("tables") or {}).items():
            expected[f"{base}/{name}"] = str(table.get("checksum", "")).removeprefix("sha256:")
        manifest_rel = layout.version_manifest(dataset, version_label, str(key_), int(version))
        expected[manifest_rel] = str(event.get("manifest", {}).get("checksum", "")).removeprefix("sha256:")
        if event.get("run_id") != run.get("runId") or event.get("decision_hash") != run.get("decisionHash"):
            problems.append(
                f"partition {key_} version {version}: its event names another run or decision hash"
            )
    actual = {name: (s.get("digest") or {}).get("sha256") for name, s in subjects.items()}
    if actual != expected:
        problems.append("the subjects are not exactly the files and manifests the run's commit events name")
    listed = {
        (p.get("key"), p.get("version")): p for p in predicate.get("partitions") or [] if isinstance(p, dict)
    }
    for (key_, version), event in committed.items():
        entry = listed.get((key_, version))
        if entry is None or (entry.get("merkleRoot"), entry.get("eventHash")) != (
            event.get("merkle_root"),
            event.get("chain", {}).get("event_hash"),
        ):
            problems.append(
                f"partition {key_} version {version}: the predicate disagrees with its commit event"
            )
    if set(listed) != set(committed):
        problems.append("the predicate's partitions are not the run's committed partitions")
    checked = 0
    if lake is not None:
        for name, digest in sorted(actual.items()):
            data = lake.read_if_exists(name)
            if data is None:
                problems.append(f"{name}: missing from the lake")
            elif hashlib.sha256(data).hexdigest() != digest:
                problems.append(f"{name}: its bytes do not have the subject's sha256")
            else:
                checked += 1
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
        "subjects": len(subjects),
        "subjectsCheckedInLake": checked if lake is not None else None,
        "auditEvents": len(predicate.get("auditEvents") or []),
    }


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
