"""`pcbo evidence export --run R [--output FILE]` and `pcbo evidence verify FILE --key VKEY [--lake URL]
[--witness-key VKEY ... --min-witnesses N] [--approver-key VKEY ... --min-approvals N] [--origin-prefix P]
[--signed-events]` (`evidence/package.py`)."""

from __future__ import annotations

import argparse
from typing import Any

from pcbo_dagster.cli.common import Findings, add_common_options, name_arg, open_environment, read_input
from pcbo_dagster.core.checkpoints import DEFAULT_ORIGIN_PREFIX
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.request_model import parse_json_strict
from pcbo_dagster.core.signed_note import VerifierKey


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.evidence.package import export

    with open_environment(args, create=False) as env:
        return export(env, args.run)


def approver_requirement(
    texts: list[str] | None, minimum: int | None, operator: VerifierKey
) -> tuple[list[VerifierKey] | None, int]:
    """`--approver-key VKEY ...` and `--min-approvals N`: the approvers' keys the auditor trusts (None
    when not given) and N (0 when not given); `InvalidInput` unless each key is an Ed25519 (type 0x01)
    key, its name and key given once (the rules of a dataset's `rollout.approvers`), and not the
    operator's key (`--key`, under any name: whoever holds it re-signs packages, and would approve its
    own promotions), and N, when given, is between 1 and the number of keys (N distinct keys must
    verify)."""
    from pcbo_dagster.core.signed_approvals import approver_key_problem
    from pcbo_dagster.engine.transparency_log import parse_key_argument

    if texts is None:
        if minimum is not None:
            raise InvalidInput("--min-approvals", "requires --approver-key: the approvers' keys it counts")
        return None, 0
    keys: list[VerifierKey] = []
    for text in texts:
        key = parse_key_argument(text, "--approver-key")
        problem = approver_key_problem(key, keys)
        if problem is None and key.public_key == operator.public_key:
            problem = f"{key.name}: the operator's key (--key) approves nothing it promoted itself"
        if problem is not None:
            raise InvalidInput("--approver-key", problem)
        keys.append(key)
    if minimum is not None and not 1 <= minimum <= len(keys):
        raise InvalidInput("--min-approvals", f"must be between 1 and the {len(keys)} --approver-key given")
    return keys, minimum or 0


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.settings import store_location
    from pcbo_dagster.engine.transparency_log import parse_key_argument, witness_requirement
    from pcbo_dagster.evidence.package import verify
    from pcbo_dagster.io.env_vars import plain_path
    from pcbo_dagster.lake.storage import LakeStorage

    key = parse_key_argument(args.key, "--key")
    witnesses, minimum = witness_requirement(args.witness_key, args.min_witnesses, key)
    approvers, min_approvals = approver_requirement(args.approver_key, args.min_approvals, key)
    lake_url = store_location("--lake", plain_path("--lake", args.lake))
    raw, _ = read_input(args.file, flag="FILE")
    lake = LakeStorage(lake_url) if lake_url else None
    document = verify(
        parse_json_strict(raw, what="evidence package").value,
        key,
        lake,
        witnesses,
        min_witnesses=minimum,
        origin_prefix=args.origin_prefix,
        approver_keys=approvers,
        min_approvals=min_approvals,
        signed_events=args.signed_events,
    )
    if not document["valid"]:
        raise Findings(document)
    return document


def add_evidence_commands(sub: Any) -> None:
    evidence = sub.add_parser("evidence", help="signed in-toto evidence packages of a run")
    actions = evidence.add_subparsers(dest="evidence_command", required=True)
    p = actions.add_parser("export", help="write the run's evidence package (a signed DSSE envelope)")
    p.add_argument("--run", required=True, type=name_arg, help="the run id")
    add_common_options(p)
    p.set_defaults(func=cmd_export)
    p = actions.add_parser("verify", help="check an evidence package offline")
    p.add_argument("file", metavar="FILE", help="the evidence package ('-' for stdin)")
    p.add_argument("--key", required=True, help="the operator's verifier key (or a file holding it)")
    p.add_argument("--lake", help="also read every subject from this lake and compare its sha256")
    p.add_argument(
        "--witness-key", action="append", help="a witness's cosigner verifier key you trust (repeatable)"
    )
    p.add_argument(
        "--min-witnesses",
        type=int,
        help="how many --witness-key cosignatures the package's checkpoint must carry (default 0: "
        "then it proves only what the operator's key signs)",
    )
    p.add_argument(
        "--approver-key",
        action="append",
        help="an approver's verifier key you trust (repeatable): every approval the run's promotion relied "
        "on must be signed by one of them and say what its audit event says",
    )
    p.add_argument(
        "--min-approvals",
        type=int,
        help="how many distinct --approver-key approvers must have approved each promotion of the run "
        "(its approvals verified under that many keys; the package must hold a promotion)",
    )
    p.add_argument(
        "--origin-prefix",
        default=DEFAULT_ORIGIN_PREFIX,
        help="the log's origin is exactly <this><dataset>/<versionLabel> (default pcbo/; the operator's "
        "PCBO_CHECKPOINT_ORIGIN_PREFIX)",
    )
    p.add_argument(
        "--signed-events",
        action="store_true",
        help="every event of the package must carry the operator's signature (--key) at its place: for a "
        "chain the key signed from its first event (without it, from the first event the key signed on)",
    )
    p.add_argument("--output", help="write the JSON document here instead of stdout")
    p.set_defaults(func=cmd_verify)
