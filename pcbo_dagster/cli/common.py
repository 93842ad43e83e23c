"""What the `pcbo` commands share: the common options, reading `--input`, writing the JSON document,
the engine settings and environment from the flags, and the datasets config."""

from __future__ import annotations

import argparse
import io
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.json_documents import streamed_text
from pcbo_dagster.core.request_model import NAME_PATTERN
from pcbo_dagster.io.atomic_files import replacing
from pcbo_dagster.io.env_vars import plain_path, positive_int


def check_output_target(output: str | None) -> None:
    """`--output` must be writable where it points before any work is done (so a bad one costs
    nothing and writes nothing): its directory exists, and it is not a directory itself."""
    if output is None or output == "-":
        return
    plain_path("--output", output)
    path = Path(output)
    if path.is_dir():
        raise InvalidInput("--output", f"{output} is a directory")
    if not path.parent.is_dir():
        raise InvalidInput("--output", f"the directory {path.parent} does not exist")


def write_output(document: dict[str, Any], output: str | None) -> None:
    """Write `document` as indented JSON (`streamed_text`), to stdout or `output`; a regular file is
    replaced all-or-nothing, anything else (/dev/stdout, a pipe) written to."""
    if output is None or output == "-":
        for piece in streamed_text(document):
            sys.stdout.write(piece)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return
    path = Path(output)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        # /dev/stdout, a pipe, a device: write to it, never rename over it.
        with open(path, "wb") as raw:
            _write_text(document, raw)
        return
    with replacing(path, prefix=f".{path.name}.") as raw:
        _write_text(document, raw)


def _write_text(document: dict[str, Any], raw: Any) -> None:
    writer = io.TextIOWrapper(raw, encoding="utf-8", newline="\n", write_through=False)
    for piece in streamed_text(document):
        writer.write(piece)
    writer.write("\n")
    writer.flush()
    writer.detach()


#: The most a flag's file (`--input`, a proof, a checkpoint, a statement, an evidence package) may hold
#: (`PCBO_MAX_INPUT_BYTES`, default 1 GiB): it is read whole, so `/dev/zero` or a runaway pipe would
#: otherwise take every byte of memory. Larger backfills name a `source` instead of inline records.
DEFAULT_MAX_INPUT_BYTES = 1 << 30
_READ_CHUNK = 16 << 20


def read_input(path: str, flag: str = "--input") -> tuple[bytes, Path | None]:
    """The bytes of the file `flag` names (`-`: stdin) and its directory; `InvalidInput` naming
    `flag` when it cannot be read or holds more than `PCBO_MAX_INPUT_BYTES`."""
    plain_path(flag, path)  # not '' (the current directory) nor a name with a stray newline
    variable = "PCBO_MAX_INPUT_BYTES"
    limit = positive_int(variable, os.environ.get(variable), DEFAULT_MAX_INPUT_BYTES)
    try:
        if path == "-":
            return _read_bounded(sys.stdin.buffer, limit, path, flag), Path.cwd()
        file = Path(path)
        with file.open("rb") as stream:
            return _read_bounded(stream, limit, path, flag), file.resolve().parent
    except OSError as exc:
        raise InvalidInput(flag, f"cannot read {path}: {exc.strerror or exc}") from None


def _read_bounded(stream: BinaryIO, limit: int, path: str, flag: str) -> bytes:
    """All of `stream`, refused past `limit` bytes: a regular file by its size, in one read; anything
    else (a pipe, a device) a chunk at a time."""
    too_large = InvalidInput(flag, f"{path} holds more than {limit} bytes (PCBO_MAX_INPUT_BYTES)")
    try:
        size = os.fstat(stream.fileno())
    except (OSError, ValueError):  # a stream with no descriptor (stdin replaced in-process)
        size = None
    if size is not None and stat.S_ISREG(size.st_mode):
        if size.st_size > limit:
            raise too_large
        data = stream.read()
        if len(data) > limit:  # grown since
            raise too_large
        return data
    chunks: list[bytes] = []
    held = 0
    while chunk := stream.read(min(_READ_CHUNK, limit + 1 - held)):
        chunks.append(chunk)
        held += len(chunk)
        if held > limit:
            raise too_large
    return b"".join(chunks)


def engine_settings(args: argparse.Namespace) -> Any:
    from pcbo_dagster.engine.settings import Settings

    return Settings.resolve(
        home=args.home,
        lake=args.lake,
        catalog=args.catalog,
        audit_dir=args.audit_dir,
        audit_endpoint=getattr(args, "audit_endpoint", None),
        parallel=getattr(args, "parallel", None),
        signing_key=getattr(args, "signing_key", None),
        witnesses=getattr(args, "witness", None),
        sql_target_urls=getattr(args, "target_url", None),
    )


@contextmanager
def open_environment(args: argparse.Namespace, create: bool = True) -> Iterator[Any]:
    """The engine environment the flags name; `create=False` for commands that only look at or undo
    what is there (nothing is created when there is nothing)."""
    from pcbo_dagster.engine.environment import Environment

    env = Environment.open(engine_settings(args), create=create)
    try:
        yield env
    finally:
        env.close()


class Findings(Exception):
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document


def name_arg(value: str) -> str:
    import re

    if not re.fullmatch(NAME_PATTERN, value):  # fullmatch: `$` alone would let a trailing newline in
        raise argparse.ArgumentTypeError(f"must match {NAME_PATTERN}")
    return value


def partition_key_arg(value: str) -> str:
    """A partition key given on the command line: exactly a time or ledger key (it names a lake
    directory, so nothing else gets near a path)."""
    from pcbo_dagster.core.partition_keys import PartitionKeyError, validate_partition_key

    try:
        return validate_partition_key(value)
    except PartitionKeyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_listen_address(host: str, port: int, any_port: bool = False) -> None:
    """`--host` and `--port` of a server (`pcbo serve`, `pcbo witness serve`), checked before anything
    is opened: an empty host would listen on every interface, not on the one meant; a port is
    1-65535 (0 too with `any_port`: any free port)."""
    if host == "":
        raise InvalidInput(
            "--host", "is empty, which listens on every interface: name the address (0.0.0.0 for all)"
        )
    plain_path("--host", host)
    lowest = 0 if any_port else 1
    if not lowest <= port <= 65535:
        raise InvalidInput("--port", f"must be a TCP port ({lowest}-65535), not {port}")


def add_common_options(p: argparse.ArgumentParser, where: bool = True, signs: bool = True) -> None:
    """`--output`, and (`where`) the flags saying where the engine reads and writes, with (`signs`:
    a command that may append to an audit chain) how checkpoints are signed and witnessed."""
    p.add_argument("--output", help="write the JSON document here instead of stdout")
    if where:
        p.add_argument("--home", help="PCBO_HOME (default ./.pcbo)")
        p.add_argument("--lake", help="lake URL or path (PCBO_LAKE_URL; default $PCBO_HOME/lake)")
        p.add_argument(
            "--catalog", help="catalog URL (PCBO_CATALOG_URL; default sqlite:///$PCBO_HOME/catalog.db)"
        )
        p.add_argument("--audit-dir", help="audit backup directory (PCBO_AUDIT_DIR; default $PCBO_HOME/pas)")
    if where and signs:
        p.add_argument(
            "--signing-key",
            help="the operator's private key file: checkpoints of the audit chains are signed with it "
            "(PCBO_SIGNING_KEY; default: none, nothing is signed)",
        )
        p.add_argument(
            "--witness",
            action="append",
            metavar="'VKEY URL'",
            help="a witness asked to cosign each checkpoint: its cosigner verifier key and URL "
            "(repeatable; PCBO_WITNESSES, ';'-separated)",
        )


def add_target_url_option(p: argparse.ArgumentParser) -> None:
    """`--target-url` (repeatable): how to connect to a SQL target the audit chain names."""
    p.add_argument(
        "--target-url",
        action="append",
        metavar="URL",
        help="a SQL target's URL (with its user; the password from PGPASSWORD or ~/.pgpass), used for "
        "the target the audit chain records at the same location (PCBO_SQL_TARGET_URLS; repeatable)",
    )


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    """`--dataset` and `--version-label`: which dataset version's partitions a command works on."""
    p.add_argument("--dataset", required=True, type=name_arg, help="the dataset name")
    p.add_argument(
        "--version-label", default="v1", type=name_arg, help="the dataset's version label (default v1)"
    )
