"""The `pcbo` command line: plan, dry-run, execute, verify, proof, verify-proof, rollback.

Every command prints one JSON document (stdout, or `--output FILE`). Exit status: 0 done; 2 invalid
input (a message naming the field on stderr, nothing written); 3 blocked by a gate (nothing
written; the document says why); 1 anything else (including verify findings and invalid proofs).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pcbo_dagster.core.errors import Blocked, InvalidInput, PcboError
from pcbo_dagster.core.request_model import NAME_PATTERN, parse_json_strict


def _write_output(document: dict[str, Any], output: str | None) -> None:
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if output is None or output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(output)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        # /dev/stdout, a pipe, a device: write to it, never rename over it.
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_input(path: str) -> tuple[bytes, Path | None]:
    try:
        if path == "-":
            return sys.stdin.buffer.read(), Path.cwd()
        file = Path(path)
        return file.read_bytes(), file.resolve().parent
    except OSError as exc:
        raise InvalidInput("--input", f"cannot read {path}: {exc.strerror or exc}") from None


def _settings(args: argparse.Namespace) -> Any:
    from pcbo_dagster.engine.settings import Settings

    return Settings.resolve(
        home=args.home,
        lake=args.lake,
        catalog=args.catalog,
        audit_dir=args.audit_dir,
        audit_endpoint=getattr(args, "audit_endpoint", None),
    )


@contextmanager
def _environment(args: argparse.Namespace) -> Iterator[Any]:
    from pcbo_dagster.engine.environment import Environment

    env = Environment.open(_settings(args))
    try:
        yield env
    finally:
        env.close()


def _load(args: argparse.Namespace) -> Any:
    from pcbo_dagster.engine.request_loading import evaluate, load_request

    raw, base_dir = _read_input(args.input)
    loaded = load_request(raw, base_dir)
    plan, decisions = evaluate(loaded)
    return loaded, plan, decisions


def cmd_plan(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.core.plan import build_plan
    from pcbo_dagster.engine.request_loading import load_request

    raw, base_dir = _read_input(args.input)
    loaded = load_request(raw, base_dir)
    return build_plan(loaded.request, loaded.digests).to_json()


def cmd_dry_run(args: argparse.Namespace) -> dict[str, Any]:
    _, _, decisions = _load(args)
    return decisions.to_json()


def _progress_bar(total: int) -> Any:
    if not sys.stderr.isatty() or total < 2:
        return None
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
    return progress


def cmd_execute(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.execute import check_gates, execute

    loaded, plan, decisions = _load(args)
    check_gates(loaded, decisions)
    bar = _progress_bar(len(plan.partitions))
    with _environment(args) as env:
        if bar is None:
            return execute(env, loaded, plan, decisions)
        with bar:
            task = bar.add_task("execute", total=len(plan.partitions))
            return execute(env, loaded, plan, decisions, progress=lambda n: bar.advance(task, n))


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.verify import verify

    with _environment(args) as env:
        document = verify(env, repair=args.repair)
    if document["status"] != "clean":
        raise _Findings(document)
    return document


def cmd_proof(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine import proofs
    from pcbo_dagster.lake.storage import LakeStorage

    lake = LakeStorage(_settings(args).lake_url)
    if args.from_version is not None or args.to_version is not None:
        if args.from_version is None or args.to_version is None:
            raise InvalidInput("--from-version", "a consistency proof needs --from-version and --to-version")
        return proofs.consistency(
            lake, args.dataset, args.version_label, args.partition, args.from_version, args.to_version
        )
    if args.id is None:
        raise InvalidInput("--id", "give the id to prove (or --from-version/--to-version)")
    return proofs.inclusion(lake, args.dataset, args.version_label, args.partition, args.id)


def cmd_verify_proof(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.proofs import verify_proof

    raw, _ = _read_input(args.proof)
    document = verify_proof(parse_json_strict(raw, what="proof").value, root=args.root)
    if not document["valid"]:
        raise _Findings(document)
    return document


def cmd_rollback(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.engine.rollback import rollback

    with _environment(args) as env:
        return rollback(
            env,
            args.dataset,
            args.version_label,
            run_id=args.run_id,
            partition_key=args.partition,
            reason=args.reason,
        )


class _Findings(Exception):
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document


def _name(value: str) -> str:
    import re

    if not re.match(NAME_PATTERN, value):
        raise argparse.ArgumentTypeError(f"must match {NAME_PATTERN}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcbo", description="Policy-constrained backfills into a parquet lake."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, where: bool = True) -> None:
        p.add_argument("--output", help="write the JSON document here instead of stdout")
        if where:
            p.add_argument("--home", help="PCBO_HOME (default ./.pcbo)")
            p.add_argument("--lake", help="lake URL or path (PCBO_LAKE_URL; default $PCBO_HOME/lake)")
            p.add_argument(
                "--catalog", help="catalog URL (PCBO_CATALOG_URL; default sqlite:///$PCBO_HOME/catalog.db)"
            )
            p.add_argument(
                "--audit-dir", help="audit backup directory (PCBO_AUDIT_DIR; default $PCBO_HOME/pas)"
            )

    for name, func, help_text in (
        ("plan", cmd_plan, "print the partition plan and its hash"),
        ("dry-run", cmd_dry_run, "print every decision; write nothing"),
        ("execute", cmd_execute, "write, prove, audit and reconcile every partition"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--input", required=True, help="the request JSON file ('-' for stdin)")
        common(p, where=name == "execute")
        if name == "execute":
            p.add_argument("--audit-endpoint", help="HTTP endpoint for audit events (PCBO_AUDIT_ENDPOINT)")
        p.set_defaults(func=func)

    p = sub.add_parser("verify", help="re-check the lake, catalog and audit chains")
    common(p)
    p.add_argument("--repair", action="store_true", help="append events missing after a crash")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("proof", help="inclusion proof of an id, or consistency proof between versions")
    common(p)
    p.add_argument("--dataset", required=True, type=_name)
    p.add_argument("--version-label", default="v1", type=_name)
    p.add_argument("--partition", required=True, help="partition key, e.g. 20240101T000000Z")
    p.add_argument("--id")
    p.add_argument("--from-version", type=int)
    p.add_argument("--to-version", type=int)
    p.set_defaults(func=cmd_proof)

    p = sub.add_parser("verify-proof", help="check a proof offline (no lake access)")
    p.add_argument("--proof", required=True, help="the proof JSON file ('-' for stdin)")
    p.add_argument("--root", help="the Merkle root you trust (default: the one in the proof)")
    p.add_argument("--output")
    p.set_defaults(func=cmd_verify_proof)

    p = sub.add_parser("rollback", help="undo the partitions a run wrote, or one partition")
    common(p)
    p.add_argument("--dataset", required=True, type=_name)
    p.add_argument("--version-label", default="v1", type=_name)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--run-id", type=_name)
    target.add_argument("--partition")
    p.add_argument("--reason", default="requested")
    p.set_defaults(func=cmd_rollback)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        document = args.func(args)
    except InvalidInput as exc:
        print(f"pcbo {args.command}: invalid input: {exc}", file=sys.stderr)
        return 2
    except Blocked as exc:
        _write_output(exc.document, args.output)
        print(f"pcbo {args.command}: blocked: {exc}", file=sys.stderr)
        return 3
    except _Findings as exc:
        _write_output(exc.document, args.output)
        print(f"pcbo {args.command}: not valid; see the findings", file=sys.stderr)
        return 1
    except PcboError as exc:
        document = getattr(exc, "document", None)
        if document is not None:
            _write_output(document, args.output)
        print(f"pcbo {args.command}: {exc}", file=sys.stderr)
        return 1
    _write_output(document, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
