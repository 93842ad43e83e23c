"""`pcbo evidence export --run R [--output FILE]` and `pcbo evidence verify FILE --key VKEY [--lake URL]
[--witness-key VKEY ... --min-witnesses N] [--origin-prefix P]` (`evidence/package.py`)."""

from __future__ import annotations

import argparse
from typing import Any

from pcbo_dagster.cli.common import Findings, add_common_options, name_arg, open_environment, read_input
from pcbo_dagster.core.checkpoints import DEFAULT_ORIGIN_PREFIX
from pcbo_dagster.core.request_model import parse_json_strict


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.evidence.package import export

    with open_environment(args, create=False) as env:
        return export(env, args.run)


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.settings import store_location
    from pcbo_dagster.engine.transparency_log import parse_key_argument, witness_requirement
    from pcbo_dagster.evidence.package import verify
    from pcbo_dagster.io.env_vars import plain_path
    from pcbo_dagster.lake.storage import LakeStorage

    key = parse_key_argument(args.key, "--key")
    witnesses, minimum = witness_requirement(args.witness_key, args.min_witnesses, key)
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
        "--origin-prefix",
        default=DEFAULT_ORIGIN_PREFIX,
        help="the log's origin is exactly <this><dataset>/<versionLabel> (default pcbo/; the operator's "
        "PCBO_CHECKPOINT_ORIGIN_PREFIX)",
    )
    p.add_argument("--output", help="write the JSON document here instead of stdout")
    p.set_defaults(func=cmd_verify)
