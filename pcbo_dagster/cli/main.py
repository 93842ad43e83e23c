"""The `pcbo` command line: plan, dry-run, execute, verify, proof, verify-proof, rollback; and for the
Dagster code location: validate-config, demo-data and `execute --dagster URL` (run a request on a
Dagster webserver as a `pcbo_request` run).

Every command prints one JSON document (stdout, or `--output FILE`). Exit status: 0 done; 2 invalid
input (a message naming the field on stderr, nothing written); 3 blocked by a gate (nothing
written; the document says why); 1 anything else (including verify findings and invalid proofs).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import gc
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from pcbo_dagster.cli.common import (
    Findings,
    add_common_options,
    add_dataset_options,
    add_target_url_option,
    check_output_target,
    engine_settings,
    name_arg,
    open_environment,
    partition_key_arg,
    read_input,
    write_output,
)
from pcbo_dagster.cli.evidence_commands import add_evidence_commands
from pcbo_dagster.cli.key_commands import add_key_commands
from pcbo_dagster.cli.log_commands import add_log_commands
from pcbo_dagster.cli.rollout_commands import add_rollout_commands
from pcbo_dagster.cli.server_commands import add_server_commands
from pcbo_dagster.core.errors import Blocked, InvalidInput, PcboError, Terminated, interrupting_signal
from pcbo_dagster.core.request_model import parse_json_strict
from pcbo_dagster.io.env_vars import plain_path
from pcbo_dagster.io.redaction import (
    is_store_error,
    one_line_error,
    quiet_store_client_logs,
    redact_url,
    scrub_text,
    terminal_text,
)

#: The flags that say where and how this process writes: meaningless when another runs the request
#: (`--server`, `--dagster`), so refused there rather than silently ignored.
_LOCAL_FLAGS = (
    "home",
    "lake",
    "catalog",
    "audit_dir",
    "audit_endpoint",
    "signing_key",
    "witness",
    "parallel",
)


def _remote(args: argparse.Namespace) -> dict[str, Any]:
    """`--server URL`: the same command on a `pcbo serve` (the token from PCBO_TOKEN)."""
    from pcbo_dagster.cli.remote_client import send_request

    plain_path("--server", args.server)  # '' (an unset variable expanded) is no server
    for flag in (*_LOCAL_FLAGS, "dagster", "dagster_location"):
        if getattr(args, flag, None) not in (None, []):
            raise InvalidInput(
                f"--{flag.replace('_', '-')}",
                "does not apply with --server: the server's own settings decide where and how it writes",
            )
    raw, _ = read_input(args.input)
    return send_request(args.server, args.command, raw)


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.server is not None:
        return _remote(args)
    from pcbo_dagster.engine.backfill_commands import plan_document

    raw, base_dir = read_input(args.input)
    return plan_document(raw, base_dir)


def cmd_dry_run(args: argparse.Namespace) -> dict[str, Any]:
    if args.server is not None:
        return _remote(args)
    from pcbo_dagster.engine.backfill_commands import evaluate_request
    from pcbo_dagster.engine.settings import Settings

    raw, base_dir = read_input(args.input)
    # Not closed: the document's partitions are read from a streamed source's spill as it is
    # written out; the spill goes when the process ends. The settings only say whose audit chain
    # names a SQL target's journal (read, nothing written).
    settings = functools.partial(Settings.resolve, home=args.home, audit_dir=args.audit_dir)
    return evaluate_request(raw, base_dir, settings=settings).decisions.to_json(lazy=True)


@contextmanager
def _progress_bar(total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on a terminal for an execute of `total` partitions; silent otherwise."""
    if not sys.stderr.isatty() or total < 2:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("execute"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )
    with progress:
        task = progress.add_task("execute", total=total)
        yield lambda n: progress.advance(task, n)


def cmd_execute(args: argparse.Namespace) -> dict[str, Any]:
    if args.server is not None:  # given empty (an unset variable expanded): refused, not run here
        return _remote(args)
    if args.dagster is not None:
        return _execute_on_dagster(args)
    from pcbo_dagster.engine.backfill_commands import execute_request

    raw, base_dir = read_input(args.input)
    return execute_request(engine_settings(args), raw, base_dir, progress=_progress_bar)


def _trusted_checkpoint(args: argparse.Namespace) -> Any:
    """`--trusted-checkpoint FILE --key VKEY [--witness-key VKEY ...] [--min-witnesses N]`, checked
    before anything is opened (bad input: exit 2)."""
    from pcbo_dagster.engine.transparency_log import (
        parse_key_argument,
        read_trusted_checkpoint,
        witness_requirement,
    )
    from pcbo_dagster.engine.verify import TrustedCheckpoint

    given = [args.key is not None, bool(args.witness_key), args.min_witnesses is not None]
    if args.trusted_checkpoint is None:
        if any(given):
            raise InvalidInput("--trusted-checkpoint", "--key, --witness-key and --min-witnesses need it")
        return None
    if args.key is None:
        raise InvalidInput("--key", "give the operator's verifier key that signed the trusted checkpoint")
    key = parse_key_argument(args.key, "--key")
    data, _ = read_input(args.trusted_checkpoint, flag="--trusted-checkpoint")
    checkpoint, note = read_trusted_checkpoint(data, key, "--trusted-checkpoint")
    witness_keys, minimum = witness_requirement(args.witness_key, args.min_witnesses, key)
    return TrustedCheckpoint(checkpoint, note, witness_keys, minimum)


def _ledger_anchors(texts: list[str]) -> list[Any]:
    """`--trusted-ledger DATASET/VERSION:SEQUENCE:HASH` (repeatable), each parsed."""
    from pcbo_dagster.core.ledger_links import LedgerAnchor

    try:
        return LedgerAnchor.parse_all(texts)
    except ValueError as exc:
        raise InvalidInput("--trusted-ledger", str(exc)) from None


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.verify import verify

    trusted = _trusted_checkpoint(args)
    anchors = _ledger_anchors(args.trusted_ledger or [])
    with open_environment(args, create=False) as env:
        document = verify(env, repair=args.repair, trusted=trusted, anchors=anchors)
    if document["status"] != "clean":
        raise Findings(document)
    return document


def cmd_proof(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine import proofs
    from pcbo_dagster.engine.transparency_log import other_history_of

    old: int | None = args.from_version
    new: int | None = args.to_version
    if (old is None) != (new is None):
        raise InvalidInput("--from-version", "a consistency proof needs --from-version and --to-version")
    if old is None and args.id is None:
        raise InvalidInput("--id", "give the id to prove (or --from-version/--to-version)")
    if old is not None and args.id is not None:
        raise InvalidInput(
            "--id", "an inclusion proof (--id) or a consistency proof (--from-version/--to-version), not both"
        )
    with open_environment(args, create=False) as env:
        sources = proofs.ProofSources(
            env.lake,
            env.audit.backup,
            env.catalog.chain_heads(),
            other_history_of(env.catalog, env.lake, env.signing_key),
        )
        if old is not None and new is not None:
            return proofs.consistency(sources, args.dataset, args.version_label, args.partition, old, new)
        return proofs.inclusion(sources, args.dataset, args.version_label, args.partition, args.id)


def cmd_verify_proof(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.proofs import verify_proof

    raw, _ = read_input(args.proof, flag="--proof")
    document = verify_proof(parse_json_strict(raw, what="proof").value, root=args.root)
    if not document["valid"]:
        raise Findings(document)
    return document


def cmd_rollback(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.rollback import rollback

    with open_environment(args, create=False) as env:
        return rollback(
            env,
            args.dataset,
            args.version_label,
            run_id=args.run_id,
            partition_key=args.partition,
            version=args.version,
            reason=args.reason,
        )


def cmd_query(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.tables.query import query

    with open_environment(args, create=False) as env:
        return query(env, args.dataset, args.version_label, args.sql, branch=args.branch, reader=args.reader)


def cmd_gc(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.garbage_collection import collect_garbage

    with open_environment(args, create=False) as env:
        return collect_garbage(env, dry_run=args.dry_run)


# -- the Dagster code location ---------------------------------------------------------------------


def _execute_on_dagster(args: argparse.Namespace) -> dict[str, Any]:
    """Validate and gate the request here (nothing is submitted when it fails), then run it on Dagster."""
    plain_path("--dagster", args.dagster)
    for flag in _LOCAL_FLAGS:
        if getattr(args, flag, None) not in (None, []):
            raise InvalidInput(
                f"--{flag.replace('_', '-')}",
                "does not apply with --dagster: the code location's pcbo resource decides where and how "
                "runs write",
            )
    if not 0 < args.dagster_timeout < float("inf"):  # NaN fails this too
        raise InvalidInput(
            "--dagster-timeout", f"must be a positive, finite number of seconds, not {args.dagster_timeout}"
        )
    from pcbo_dagster.dagster_defs.remote import validate_and_submit

    raw, base_dir = read_input(args.input)
    return validate_and_submit(
        args.dagster, raw, base_dir, timeout=args.dagster_timeout, location=args.dagster_location
    )


def _count_time_windows(partitioning: Any) -> tuple[int | None, str | None, str | None]:
    """(count, first key, last key) of a closed time window; (None, ...) when it is open-ended."""
    from pcbo_dagster.core.instants import to_datetime
    from pcbo_dagster.core.partition_keys import format_time_key

    end_us = partitioning.end_us
    if end_us is None:
        return None, format_time_key(partitioning.start_us), None
    if partitioning.fixed_window_seconds is not None:
        keys = partitioning.keys()
    else:
        try:
            from pcbo_dagster.dagster_defs.partitions import time_window_partitions_def
        except ImportError:  # the dagster extra is not installed: irregular crons are not counted
            return None, None, None
        keys = time_window_partitions_def(partitioning).get_partition_keys(current_time=to_datetime(end_us))
    return len(keys), keys[0] if keys else None, keys[-1] if keys else None


def _dataset_summary(config: Any, dataset: Any) -> dict[str, Any]:
    partitioning = dataset.partitioning
    if partitioning.kind == "time_window":
        count, first, last = _count_time_windows(partitioning)
        open_ended = partitioning.end is None
    else:
        open_ended = partitioning.lastLedger is None
        if open_ended:
            count, first, last = None, None, None
        else:
            keys = partitioning.keys()
            count, first, last = len(keys), keys[0], keys[-1]
    source = config.source_uri(dataset)
    return {
        "name": dataset.name,
        "versionLabel": dataset.versionLabel,
        "assetName": dataset.asset_name,
        "chainKey": dataset.chain_key,
        "partitioning": partitioning.model_dump(),
        "partitionCount": count,
        "openEnded": open_ended,
        "firstPartition": first,
        "lastPartition": last,
        "source": {
            "uri": source,
            "format": dataset.source.resolved_format(),
            "present": Path(source).exists() if "://" not in source else None,
        },
        "target": None
        if dataset.target is None
        else {"kind": "sql", "url": redact_url(dataset.target.url), "table": dataset.target.table},
        "backfillPolicy": dataset.backfillPolicy.model_dump(),
        "pool": dataset.pool_name,
        "checkGranularity": dataset.checkGranularity,
    }


def cmd_validate_config(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.datasets.config import datasets_config_path, load_datasets_config_from_env

    path = datasets_config_path(plain_path("FILE", args.file))
    config = load_datasets_config_from_env(path)
    from pcbo_dagster.dagster_defs.definitions import check_location

    try:  # what the code location refuses at load, by the same check
        check_location(config)
    except InvalidInput as exc:
        raise InvalidInput(exc.field, f"{exc.message} (datasets config {path})") from None
    datasets = [_dataset_summary(config, d) for d in config.datasets]
    counts = [d["partitionCount"] for d in datasets]
    return {
        "status": "valid",
        "config": str(path.resolve()),
        "sourcesDir": str(config.sources_dir),
        "datasets": datasets,
        "totals": {
            "datasets": len(datasets),
            "partitions": None if None in counts else sum(counts),
        },
    }


def cmd_demo_data(args: argparse.Namespace) -> dict[str, Any]:
    import hashlib

    from pcbo_dagster.datasets.demo_data import example_sources_dir, generate_demo_data

    given = plain_path("--dir", args.dir)
    directory = Path(given) if given is not None else example_sources_dir()
    try:
        paths = generate_demo_data(directory)
    except OSError as exc:
        raise InvalidInput(
            "--dir", f"cannot write the demo sources to {directory}: {exc.strerror or exc}"
        ) from None
    files = []
    for path in paths:
        data = path.read_bytes()
        files.append(
            {
                "path": str(path.resolve()),
                "name": path.name,
                "records": data.count(b"\n"),
                "byteSize": len(data),
                "checksum": "sha256:" + hashlib.sha256(data).hexdigest(),
            }
        )
    return {"directory": str(directory.resolve()), "files": files}


def cmd_demo_sql(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.datasets.sql_demo import generate_sql_demo
    from pcbo_dagster.engine.settings import home_dir

    given = plain_path("--dir", args.dir)
    directory = Path(given) if given is not None else home_dir() / "demo_sql"
    try:
        written = generate_sql_demo(directory)
    except OSError as exc:
        raise InvalidInput(
            "--dir", f"cannot write the SQL demo to {directory}: {exc.strerror or exc}"
        ) from None
    return {
        "directory": str(directory.resolve()),
        "target": f"sqlite:///{written['table'].resolve()}",
        "table": "events",
        "request": str(written["request"].resolve()),
    }


class PcboArgumentParser(argparse.ArgumentParser):
    """argparse, but a command line it refuses (a missing, unknown or malformed flag) is reported as
    every other invalid input is: one line on stderr naming the flag, exit status 2 — not the usage
    text and a second line, and never a secret the refused words held (a `--catalog` URL given to a
    command that takes none) nor a control character a terminal would act on."""

    def error(self, message: str) -> NoReturn:
        shown = terminal_text(scrub_text(message))
        self.exit(2, f"{self.prog}: invalid input: {shown} (`{self.prog} --help` lists its flags)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = PcboArgumentParser(prog="pcbo", description="Policy-constrained backfills into a parquet lake.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, func, help_text in (
        ("plan", cmd_plan, "print the partition plan and its hash"),
        ("dry-run", cmd_dry_run, "print every decision; write nothing"),
        ("execute", cmd_execute, "write, prove, audit and reconcile every partition"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--input", required=True, help="the request JSON file ('-' for stdin)")
        p.add_argument(
            "--server",
            metavar="URL",
            help="send the request to the pcbo server at URL (`pcbo serve`; the token from PCBO_TOKEN) "
            "and print its answer, with the same exit statuses",
        )
        add_common_options(p, where=name == "execute")
        if name == "dry-run":  # a SQL target's journal: this deployment's, as its audit chain says
            p.add_argument(
                "--home",
                help="PCBO_HOME (default ./.pcbo): the deployment whose audit chain says which journal "
                "of a SQL target's run is its own",
            )
            p.add_argument(
                "--audit-dir", help="audit backup directory (PCBO_AUDIT_DIR; default $PCBO_HOME/pas)"
            )
        if name == "execute":
            p.add_argument("--audit-endpoint", help="HTTP endpoint for audit events (PCBO_AUDIT_ENDPOINT)")
            p.add_argument(
                "--parallel",
                type=int,
                metavar="N",
                help="partitions read, encoded and written at once "
                "(PCBO_PARALLEL; default 1 for a local lake, 2 there for a ledger archive source, 4 for an "
                "object store; 1: one at a time)",
            )
            p.add_argument(
                "--dagster",
                metavar="URL",
                help="run the request on the Dagster webserver at URL as a pcbo_request run "
                "(validated and gated here first; the code location's resources decide where it writes)",
            )
            p.add_argument(
                "--dagster-timeout",
                type=float,
                default=600.0,
                metavar="SECONDS",
                help="how long to wait for the Dagster run to finish (default 600)",
            )
            p.add_argument(
                "--dagster-location", help="the code location serving pcbo_request (default: the only one)"
            )
        p.set_defaults(func=func)

    p = sub.add_parser("verify", help="re-check the lake, catalog and audit chains")
    add_common_options(p)
    p.add_argument("--repair", action="store_true", help="append events missing after a crash")
    p.add_argument(
        "--trusted-checkpoint",
        metavar="FILE",
        help="a signed checkpoint you hold: the current chain must extend it (no rewrite, no truncation)",
    )
    p.add_argument(
        "--key", help="with --trusted-checkpoint: the operator's verifier key (or a file holding it)"
    )
    p.add_argument(
        "--witness-key",
        action="append",
        help="with --trusted-checkpoint: a witness's cosigner verifier key (repeatable)",
    )
    p.add_argument(
        "--min-witnesses",
        type=int,
        metavar="N",
        help="with --trusted-checkpoint: how many --witness-key cosignatures it must carry (default 0)",
    )
    p.add_argument(
        "--trusted-ledger",
        action="append",
        metavar="DATASET/VERSION:SEQUENCE:HASH",
        help="a ledger hash you trust (from the network): the lake's ledger must have it; the ledgers "
        "linked up to it are reported as anchored (repeatable)",
    )
    add_target_url_option(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("proof", help="inclusion proof of an id, or consistency proof between versions")
    add_common_options(p, signs=False)
    add_dataset_options(p)
    p.add_argument(
        "--partition", required=True, type=partition_key_arg, help="partition key, e.g. 20240101T000000Z"
    )
    p.add_argument("--id", help="the record id whose inclusion to prove")
    p.add_argument("--from-version", type=int, metavar="N", help="older version (consistency proof)")
    p.add_argument("--to-version", type=int, metavar="N", help="newer version (consistency proof)")
    p.set_defaults(func=cmd_proof)

    p = sub.add_parser("verify-proof", help="check a proof offline (no lake access)")
    p.add_argument("--proof", required=True, help="the proof JSON file ('-' for stdin)")
    p.add_argument("--root", help="the Merkle root you trust (default: the one in the proof)")
    add_common_options(p, where=False)
    p.set_defaults(func=cmd_verify_proof)

    p = sub.add_parser("rollback", help="undo the partitions a run wrote, or one partition")
    add_common_options(p)
    add_dataset_options(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--run-id", type=name_arg, help="undo every partition this run committed")
    target.add_argument(
        "--partition", type=partition_key_arg, help="undo this partition key's current version"
    )
    p.add_argument(
        "--version",
        type=int,
        help="with --partition: undo this version, when it is current (how to roll back further on purpose: "
        "a second --partition alone is a no-op)",
    )
    p.add_argument("--reason", default="requested", help="why (recorded on the audit chain)")
    add_target_url_option(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("query", help="run SQL over a dataset's Iceberg table with DuckDB")
    add_common_options(p, signs=False)
    add_dataset_options(p)
    p.add_argument("sql", metavar="SQL", help='the query; the table is named as in Iceberg ("ns.table")')
    p.add_argument("--branch", default="main", help="the table branch to read (default main; staging)")
    p.add_argument(
        "--reader",
        default="auto",
        choices=("auto", "duckdb-iceberg", "pyiceberg"),
        help="DuckDB's own Iceberg reader (the iceberg extra), or pyiceberg's scan into DuckDB; "
        "auto: the first when installed and the lake is local",
    )
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("gc", help="remove lake files a crash left behind that nothing refers to")
    add_common_options(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("validate-config", help="validate a datasets config and list its datasets")
    p.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help="the datasets YAML (default $PCBO_DATASETS_CONFIG, else the example shipped in the package)",
    )
    add_common_options(p, where=False)
    p.set_defaults(func=cmd_validate_config)

    p = sub.add_parser("demo-data", help="write the deterministic demo sources of the example config")
    p.add_argument(
        "--dir",
        help="target directory (default: where the packaged example config reads them, "
        "$PCBO_SOURCES_DIR/demo_data, else $PCBO_HOME/demo_data)",
    )
    add_common_options(p, where=False)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo-sql", help="write a demo SQLite target table and a request that backfills it")
    p.add_argument("--dir", help="target directory (default $PCBO_HOME/demo_sql)")
    add_common_options(p, where=False)
    p.set_defaults(func=cmd_demo_sql)

    add_rollout_commands(sub)
    add_log_commands(sub)
    add_key_commands(sub)
    add_evidence_commands(sub)
    add_server_commands(sub)
    return parser


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command `args` was parsed for (`pcbo rollout promote`: promote's)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                return _chosen_parser(chosen, args)
    return parser


def flag_for_field(parser: argparse.ArgumentParser, args: argparse.Namespace, field: str) -> str:
    """The flag the user gave for an engine's input field (`by` -> `--by`, `decisionHash` ->
    `--decision-hash`, `root` -> `--root`), so an error names what was typed; the field unchanged
    when no flag of the command was given for it (a field of a request or config file)."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", field).lower()
    candidates = {f"--{field}", "--" + snake.replace("_", "-")}
    for action in _chosen_parser(parser, args)._actions:
        given = getattr(args, action.dest, None)
        if candidates & set(action.option_strings) and given is not None and given != action.default:
            return action.option_strings[-1]
    return field


def _refuse_undecodable_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every value given is text pcbo can write: bytes that are not UTF-8 (Python keeps them as lone
    surrogates) would fail later, in an audit event, a catalog row or the JSON document, as an
    internal error — some after the command had begun its work. Refused first, naming the flag."""
    chosen = _chosen_parser(parser, args)
    for action in chosen._actions:
        value = getattr(args, action.dest, None)
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                flag = action.option_strings[-1] if action.option_strings else action.metavar or action.dest
                code = ord(text[exc.start])  # a byte b that is not UTF-8 arrives as U+DC00 + b
                byte = f" (byte {code - 0xDC00:#04x})" if 0xDC80 <= code <= 0xDCFF else ""
                chosen.error(f"argument {flag}: is not UTF-8 text{byte}")


#: `main`'s status for a command a Ctrl-C (SIGINT) or a SIGTERM ended: `run` then ends the process by
#: that signal, as a shell or a supervisor expects of a program it stopped (a shell reports 130, 143).
INTERRUPTED = {128 + signal.SIGINT: signal.SIGINT, 128 + signal.SIGTERM: signal.SIGTERM}


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr and the documented exit status (no
    traceback unless `PCBO_DEBUG` is set): 2 invalid input, 3 blocked, 1 anything else. A reader
    that goes away (`pcbo verify | head`) ends the command with one line and exit status 1; a Ctrl-C
    (or, under `run`, a SIGTERM) with one line and 128 + the signal's number (`INTERRUPTED`)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # refused by the command they were given to, so the message names it
        _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    _refuse_undecodable_arguments(parser, args)
    if not os.environ.get("PCBO_DEBUG"):
        quiet_store_client_logs()  # their retries' tracebacks are not the one line
    command = _chosen_parser(parser, args).prog  # `pcbo rollout start`, as its parser's errors say
    try:
        return _run(parser, args, command)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more goes to it
        _say(command, "the output was closed before the whole document was written")
        return 1
    except KeyboardInterrupt as exc:
        if os.environ.get("PCBO_DEBUG"):
            raise
        name = interrupting_signal(exc)
        message = f"interrupted ({name})"
        if args.command in ("execute", "rollback"):
            message += (
                "; what it committed stays, and the same command run again (or `pcbo verify --repair`) "
                "completes what it left half done"
            )
        _say(command, message)
        return 128 + signal.Signals[name]


def _dagster_reporting(args: argparse.Namespace, command: str) -> Any:
    """With a Dagster instance configured (`DAGSTER_HOME`), the partitions a command changes in the
    lake are reported to it (`dagster_defs/instance_reporting.py`); otherwise nothing (and Dagster
    is not imported)."""
    if not os.environ.get("DAGSTER_HOME") or getattr(args, "dagster", None):
        return contextlib.nullcontext()
    try:
        from pcbo_dagster.dagster_defs.instance_reporting import cli_reporting
    except ImportError:  # the dagster extra is not installed
        return contextlib.nullcontext()
    return cli_reporting(command)


def _say(command: str, message: str) -> None:
    """The command's error line on stderr, prefixed as its parser's own errors are (`pcbo rollout
    start: ...`), nothing in it a terminal acts on (a message may hold text pcbo did not write: a
    `--server`'s answer, a file name)."""
    print(f"{command}: {terminal_text(message)}", file=sys.stderr)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    """Run the parsed `command`; print its document (or the error) and return the exit status."""
    try:
        check_output_target(args.output)
        with _dagster_reporting(args, command):
            document = args.func(args)
        write_output(document, args.output)
        return 0
    except InvalidInput as exc:
        flag = flag_for_field(parser, args, exc.field) if exc.field else exc.field
        where = f"{flag}: " if flag else ""
        _say(command, f"invalid input: {where}{exc.message}")
        return exc.exit_status
    except Blocked as exc:
        _say(command, f"blocked: {exc}")
        write_output(exc.document, args.output)
        return exc.exit_status
    except Findings as exc:
        _say(command, "not valid; see the findings")
        write_output(exc.document, args.output)
        return 1
    except PcboError as exc:
        _say(command, scrub_text(str(exc)))
        document = getattr(exc, "document", None)
        if document is not None:
            write_output(document, args.output)
        return exc.exit_status
    except BrokenPipeError:
        raise
    except Exception as exc:
        if os.environ.get("PCBO_DEBUG"):
            raise
        if is_store_error(exc):  # a full disk, a read-only lake, a locked catalog, a store gone away
            message = one_line_error(exc)
        else:  # a bug: still one line without secrets
            message = f"internal error ({type(exc).__name__}"
            message += f": {one_line_error(exc)})" if str(exc) else ")"
            message += "; PCBO_DEBUG=1 shows the traceback"
        _say(command, message)
        return 1


def _collect_less() -> None:
    """The cyclic garbage collector tuned for a command's process: the objects of the imports made so
    far moved out of its reach (`gc.freeze`), and a young collection after 50,000 allocations
    instead of 700. A run builds hundreds of thousands of objects that are not garbage (records,
    decisions), which the default thresholds walked again and again (~0.19 s of CPU, 6% of an
    execute of the benchmark request; ~0.03 s now); what little cyclic garbage there is waits a little
    longer. Nothing else changes: reference counting still frees everything else at once."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def run() -> None:
    """The `pcbo` command (and `python -m pcbo_dagster.cli.main`): `main`, then what the interpreter
    does at exit in its order — threading's exit hooks (executors and process pools shut down) and the
    wait for non-daemon threads, then the `atexit` handlers (logging, the clean-up finalizers,
    multiprocessing's join of child processes) — the streams flushed, and the process ends with `main`'s
    status (a Ctrl-C or a SIGTERM: by that signal, `INTERRUPTED`) without tearing down the native
    libraries it loaded. A SIGTERM (`docker stop`, a Kubernetes pod's end, a supervisor) stops a command
    as a Ctrl-C does (`Terminated`), instead of ending the process at once. Arrow's thread pools, torn
    down at interpreter exit, now and then abort a process whose work is done ("terminate called without
    an active exception", status -6 instead of 0: apache/arrow#34314)."""
    _collect_less()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        status = main()
    except SystemExit as exc:  # argparse: --help, a flag it refuses (its message already printed)
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the command is over: a SIGTERM now just ends it
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # first, as Py_FinalizeEx does
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader gone away, a stream closed
                pass
        if status in INTERRUPTED:
            signal.signal(INTERRUPTED[status], signal.SIG_DFL)
            os.kill(os.getpid(), INTERRUPTED[status])
        os._exit(status)


def _terminate(signum: int, frame: Any) -> None:
    """`run`'s SIGTERM handler: the command stops where it is, as on a Ctrl-C."""
    raise Terminated()


if __name__ == "__main__":
    run()
