"""`pcbo keys generate --name NAME [--key-file FILE]` and `pcbo keys show --key FILE`.

`generate` writes a new Ed25519 private key (C2SP signed-note / Go `PRIVATE+KEY+...` text, mode
0600, never over an existing file) and prints its public forms: the verifier key that checks its
checkpoint, approval and evidence signatures (`verifierKey`, type 0x01) and the one that checks its
cosignatures when it is a witness's key (`cosignerVerifierKey`, type 0x04). No key material is
ever printed or logged.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.signed_note import COSIGNATURE_V1, NoteError, SigningKey, new_signing_key
from pcbo_dagster.io.env_vars import plain_path


def public_forms(key: SigningKey, path: Path) -> dict[str, Any]:
    return {
        "name": key.name,
        "keyFile": str(path),
        "keyId": key.verifier().key_id.hex(),
        "verifierKey": key.verifier().text,
        "cosignerVerifierKey": key.verifier(COSIGNATURE_V1).text,
    }


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    try:
        key = new_signing_key(args.name)
    except NoteError as exc:
        raise InvalidInput("--name", str(exc)) from None
    default = re.sub(r"[^A-Za-z0-9._-]", "_", args.name) + ".key"
    path = Path(plain_path("--key-file", args.key_file) or default).expanduser()
    if not path.parent.is_dir():
        raise InvalidInput("--key-file", f"the directory {path.parent} does not exist")
    data = (key.text + "\n").encode("utf-8")  # a key name may be any Unicode without spaces or '+'
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise InvalidInput("--key-file", f"{path} exists: a key is never overwritten") from None
    except OSError as exc:  # a name too long for the file system, a directory not writable
        raise InvalidInput("--key-file", f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"only {written} of {len(data)} bytes were written")
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)  # no empty or partial key file left to refuse the next attempt
        raise
    return public_forms(key, path.resolve())


def cmd_show(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.transparency_log import load_signing_key

    path = Path(plain_path("--key", args.key)).expanduser()
    return public_forms(load_signing_key(path, "--key"), path.resolve())


def add_key_commands(sub: Any) -> None:
    keys = sub.add_parser("keys", help="Ed25519 signing keys (operator, approvers, witnesses)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    p = actions.add_parser("generate", help="write a new private key file (mode 0600); print its public keys")
    p.add_argument(
        "--name", required=True, help="the key's name, e.g. ops.example.com/operator (no spaces, no '+')"
    )
    p.add_argument(
        "--key-file", help="where to write the private key (default ./<name>.key; never overwritten)"
    )
    p.add_argument("--output", help="write the JSON document here instead of stdout")
    p.set_defaults(func=cmd_generate)
    p = actions.add_parser("show", help="print the public keys of a private key file")
    p.add_argument("--key", required=True, help="the private key file")
    p.add_argument("--output", help="write the JSON document here instead of stdout")
    p.set_defaults(func=cmd_show)
