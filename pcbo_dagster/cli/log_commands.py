"""`pcbo log ...` (the transparency log of a dataset's audit chain) and `pcbo witness serve`:

pcbo log checkpoint --dataset D            the latest signed checkpoint, with its cosignatures
pcbo log publish --dataset D               sign a checkpoint now if the log grew; ask the witnesses
pcbo log prove-inclusion --dataset D --seq N [--size S]
pcbo log prove-consistency --dataset D --from S1 [--to S2]
pcbo log verify-proof --proof FILE --key VKEY [--checkpoint FILE ...] [--origin-prefix P]   offline
pcbo witness serve --key FILE --db PATH --log-key '[PREFIX ]VKEY' ... [--origin-prefix P] [--port N]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from pcbo_dagster.cli.common import (
    add_common_options,
    add_dataset_options,
    check_listen_address,
    open_environment,
    read_input,
)
from pcbo_dagster.core.checkpoints import DEFAULT_ORIGIN_PREFIX
from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.request_model import parse_json_strict
from pcbo_dagster.io.env_vars import plain_path


def _chain(args: argparse.Namespace) -> str:
    return f"{args.dataset}/{args.version_label}"


def cmd_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.transparency_log import full_note, latest_stored_checkpoint

    with open_environment(args, create=False) as env:
        row = latest_stored_checkpoint(env.catalog, _chain(args))
        if row is None:
            raise InvalidInput(
                "--dataset",
                f"no checkpoint of {_chain(args)} yet: run with PCBO_SIGNING_KEY set, or `pcbo log publish`",
            )
        return {
            "chainKey": _chain(args),
            "origin": row["origin"],
            "treeSize": row["tree_size"],
            "signerKey": row["signer_key"],
            "witnesses": [c["witness_key"] for c in row["cosignatures"]],
            "checkpoint": full_note(row).render(),
        }


def cmd_publish(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.transparency_log import publish

    with open_environment(args, create=False) as env:
        if env.signing_key is None:
            raise InvalidInput(
                "--signing-key", "publishing a checkpoint needs the operator's key (PCBO_SIGNING_KEY)"
            )
        return publish(env, _chain(args))


def cmd_prove_inclusion(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.transparency_log import inclusion_document

    with open_environment(args, create=False) as env:
        return inclusion_document(env, _chain(args), args.seq, args.size)


def cmd_prove_consistency(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.transparency_log import consistency_document

    with open_environment(args, create=False) as env:
        return consistency_document(env, _chain(args), args.first, args.last)


def cmd_verify_proof(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.cli.common import Findings
    from pcbo_dagster.engine.transparency_log import parse_key_argument, verify_proof_document

    key = parse_key_argument(args.key, "--key")
    raw, _ = read_input(args.proof, flag="--proof")
    held = []
    for path in args.checkpoint or []:
        data, _ = read_input(path, flag="--checkpoint")
        held.append(data.decode("utf-8", "replace"))
    document = verify_proof_document(
        parse_json_strict(raw, what="proof").value, key, held, args.origin_prefix
    )
    if not document["valid"]:
        raise Findings(document)
    return document


def cmd_witness_serve(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.transparency_log import load_signing_key, parse_key_argument
    from pcbo_dagster.witness.server import LogKey, Witness, make_server, started_line

    check_listen_address(args.host, args.port, any_port=True)
    key = load_signing_key(Path(plain_path("--key", args.key)).expanduser(), "--key")
    logs = []
    for text in args.log_key:
        prefix, _, vkey = ("", "", text) if os.path.exists(text) else text.strip().rpartition(" ")
        bound = [prefix.strip()] if prefix else args.origin_prefix or [DEFAULT_ORIGIN_PREFIX]
        logs += [LogKey(p, parse_key_argument(vkey, "--log-key")) for p in bound]
    db = Path(plain_path("--db", args.db)).expanduser()
    if not db.resolve().parent.is_dir():
        raise InvalidInput("--db", f"the directory of {args.db} does not exist")
    try:
        witness = Witness(key, str(db), logs)
    except sqlite3.DatabaseError as exc:  # (a file that is no SQLite database, a directory)
        raise InvalidInput(
            "--db", f"{args.db} is not a SQLite database the witness can open: {exc}"
        ) from None
    except ValueError as exc:
        raise InvalidInput("--log-key", str(exc)) from None
    server = make_server(witness, args.host, args.port)
    print(started_line(server, witness), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    sys.exit(0)


def add_log_commands(sub: Any) -> None:
    log = sub.add_parser(
        "log", help="the transparency log of a dataset's audit chain: checkpoints and proofs"
    )
    actions = log.add_subparsers(dest="log_command", required=True)

    def with_dataset(name: str, help_text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text)
        add_common_options(p)
        add_dataset_options(p)
        return p

    with_dataset("checkpoint", "print the latest signed checkpoint").set_defaults(func=cmd_checkpoint)
    with_dataset("publish", "sign a checkpoint now if the log grew, and ask the witnesses").set_defaults(
        func=cmd_publish
    )
    p = with_dataset("prove-inclusion", "inclusion proof of one audit event")
    p.add_argument("--seq", required=True, type=int, help="the event's seq (its leaf index)")
    p.add_argument(
        "--size", type=int, help="the tree size to prove against (default: the latest checkpoint's)"
    )
    p.set_defaults(func=cmd_prove_inclusion)
    p = with_dataset("prove-consistency", "consistency proof between two sizes of the log")
    p.add_argument("--from", dest="first", required=True, type=int, help="the older tree size")
    p.add_argument(
        "--to", dest="last", type=int, help="the newer tree size (default: the latest checkpoint's)"
    )
    p.set_defaults(func=cmd_prove_consistency)
    p = actions.add_parser(
        "verify-proof", help="check a log proof offline with a checkpoint and a public key"
    )
    p.add_argument("--proof", required=True, help="the proof JSON file ('-' for stdin)")
    p.add_argument("--key", required=True, help="the operator's verifier key (or a file holding it)")
    p.add_argument(
        "--checkpoint",
        action="append",
        help="a signed checkpoint you hold (repeatable; the proof's own are used too)",
    )
    p.add_argument(
        "--origin-prefix",
        default=DEFAULT_ORIGIN_PREFIX,
        help="the log's origin is exactly <this><chainKey> (default pcbo/; the operator's "
        "PCBO_CHECKPOINT_ORIGIN_PREFIX)",
    )
    add_common_options(p, where=False)
    p.set_defaults(func=cmd_verify_proof)

    witness = sub.add_parser("witness", help="a tlog-witness server that cosigns checkpoints")
    wactions = witness.add_subparsers(dest="witness_command", required=True)
    p = wactions.add_parser("serve", help="serve POST /add-checkpoint (runs until interrupted)")
    p.add_argument("--key", required=True, help="the witness's private key file (pcbo keys generate)")
    p.add_argument("--db", required=True, help="the SQLite file holding the latest size per log origin")
    p.add_argument(
        "--log-key",
        required=True,
        action="append",
        metavar="[PREFIX ]VKEY",
        help="a log (operator) verifier key it trusts, for the logs <PREFIX><dataset>/<versionLabel> "
        "only (repeatable; each prefix one key). Without PREFIX: for the --origin-prefix logs",
    )
    p.add_argument(
        "--origin-prefix",
        action="append",
        help="the origin prefix of a --log-key given without one (repeatable; default pcbo/)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=8089, help="port to listen on (default 8089; 0: any free port)"
    )
    p.add_argument("--output", help="unused (the server prints one line when it listens)")
    p.set_defaults(func=cmd_witness_serve)
