"""The staged-rollout commands of `pcbo` (wired into `cli.build_parser`):

    pcbo rollout start    --dataset D --from KEY --to KEY --by WHO [--name R] [--partitions-per-minute N]
                          [--records-per-minute N]        apply to staging (throttled), halt for review
    pcbo rollout pause|resume|cancel R --by WHO [--reason TEXT]   between partitions of a running apply
    pcbo rollout status R     the rollout, its history, soak state and promotion gate
    pcbo rollout list [--dataset D]
    pcbo rollout soak [R ...]                 one soak-monitor evaluation now (what the schedule runs)
    pcbo rollout promote R --by WHO           promote to production if the gate is open (exit 3 if not)
    pcbo rollout rollback (R | --dataset D --from KEY --to KEY) --stage staging|production
                          --by WHO --reason TEXT
    pcbo rollout health --dataset D [--launch]  production health report and mini backfill plan
    pcbo approve R --key FILE --reason TEXT [--decision-hash H]   (or --statement FILE: signed elsewhere)
    pcbo reject  R --key FILE --reason TEXT

The datasets config is `--config`, else `PCBO_DATASETS_CONFIG`, else the example shipped in the package; the
engine settings (`--home`, `--catalog`, ...) are the production environment's, and staging sits beside
it (`rollout/environments.py`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pcbo_dagster.cli.common import add_common_options, engine_settings


def _config(args: argparse.Namespace) -> Any:
    from pcbo_dagster.datasets.config import load_datasets_config_from_env
    from pcbo_dagster.io.env_vars import plain_path

    return load_datasets_config_from_env(plain_path("--config", args.config))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def _typed_as(field: str, flag: str, typed: bool) -> Iterator[None]:
    """Invalid input on the engine's `field` raised in the block is invalid input on `flag` when the
    user gave the value with that flag (`typed`): the error names what was typed."""
    from pcbo_dagster.core.errors import InvalidInput

    try:
        yield
    except InvalidInput as exc:
        if typed and exc.field == field:
            raise InvalidInput(flag, exc.message) from None
        raise


def cmd_start(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.core.rollout_lifecycle import check_rollout_name
    from pcbo_dagster.rollout import operations

    if args.name is not None:  # the engine names its field `rollout`; the user typed --name
        with _typed_as("rollout", "--name", True):
            check_rollout_name(args.name)
    throttle = {
        "partitionsPerMinute": args.partitions_per_minute,
        "recordsPerMinute": args.records_per_minute,
    }
    with (
        _typed_as("rollout", "--name", args.name is not None),  # the rollout the user named
        _typed_as(  # the config's limits are checked when it is read: a bad limit here was typed
            "throttle.partitionsPerMinute", "--partitions-per-minute", args.partitions_per_minute is not None
        ),
        _typed_as("throttle.recordsPerMinute", "--records-per-minute", args.records_per_minute is not None),
    ):
        return operations.start(
            _config(args),
            engine_settings(args),
            args.dataset,
            args.first,
            args.last,
            by=args.by,
            name=args.name,
            throttle=throttle,
            log=_log,
            poll_seconds=args.poll_seconds,
        )


def cmd_control(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.rollout import operations

    return operations.control(
        engine_settings(args), args.rollout, args.action, by=args.by, reason=args.reason
    )


def cmd_status(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.rollout import operations

    return operations.status(_config(args), engine_settings(args), args.rollout)


def cmd_list(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.rollout import operations

    return operations.list_rollouts(engine_settings(args), args.dataset)


def cmd_soak(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.rollout import operations

    results = operations.soak(_config(args), engine_settings(args), names=args.rollouts or None)
    skipped = sum(1 for result in results if "skipped" in result)  # not soaking, or failed for good
    return {
        "evaluated": len(results) - skipped,
        "skipped": skipped,
        "results": operations._plain(results),
    }


def cmd_promote(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.rollout import operations

    return operations.promote(_config(args), engine_settings(args), args.rollout, by=args.by)


def cmd_rollback(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.rollout import operations

    return operations.rollback(
        _config(args),
        engine_settings(args),
        args.stage,
        by=args.by,
        reason=args.reason,
        name=args.rollout,
        dataset_name=args.dataset,
        first_key=args.first,
        last_key=args.last,
    )


def cmd_health(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.rollout import operations

    return operations.health(_config(args), engine_settings(args), args.dataset, launch=args.launch)


def cmd_decide(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from pcbo_dagster.cli.common import read_input
    from pcbo_dagster.core.errors import InvalidInput
    from pcbo_dagster.engine.transparency_log import load_signing_key
    from pcbo_dagster.io.env_vars import plain_path
    from pcbo_dagster.rollout import operations

    if (args.key is None) == (args.statement is None):
        raise InvalidInput(
            "--key", "give your key (--key FILE, to sign now) or a signed statement (--statement FILE)"
        )
    statement = None
    if args.statement is not None:
        statement = read_input(args.statement, flag="--statement")[0].decode("utf-8", "replace")
    key = None
    if args.key is not None:
        key = load_signing_key(Path(plain_path("--key", args.key)).expanduser(), "--key")
    if key is not None and not (args.reason or "").strip():
        raise InvalidInput("--reason", "say why")
    with _typed_as("statement", "--key", key is not None):  # the statement was signed here with --key
        return operations.decide(
            _config(args),
            engine_settings(args),
            args.rollout,
            args.command,
            key=key,
            statement=statement,
            reason=args.reason or "",
            decision_hash=getattr(args, "decision_hash", None),
        )


def _rollout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("rollout", metavar="ROLLOUT", help="the rollout's name (see `pcbo rollout list`)")


def _by(p: argparse.ArgumentParser, who: str) -> None:
    p.add_argument("--by", required=True, help=f"who {who} (a name or an e-mail address; recorded)")


def add_rollout_commands(sub: Any) -> None:
    """Add `rollout`, `approve` and `reject` to the `pcbo` parser."""

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_common_options(p)
        p.add_argument(
            "--config",
            help="the datasets YAML (PCBO_DATASETS_CONFIG; default the example shipped in the package)",
        )
        return p

    rollout = sub.add_parser(
        "rollout", help="staged rollout: staging apply, soak, promotion, rollback, health"
    )
    actions = rollout.add_subparsers(dest="rollout_command", required=True)

    p = with_config(actions.add_parser("start", help="apply a range of partitions to staging (throttled)"))
    p.add_argument("--dataset", required=True, help="the configured dataset (it must have a rollout block)")
    p.add_argument("--from", dest="first", required=True, metavar="KEY", help="first partition key")
    p.add_argument("--to", dest="last", required=True, metavar="KEY", help="last partition key (included)")
    p.add_argument("--name", help="rollout name (default <dataset>-<from>-<to>)")
    _by(p, "starts it")
    p.add_argument("--partitions-per-minute", type=float, help="override the dataset's throttle")
    p.add_argument("--records-per-minute", type=float, help="override the dataset's throttle")
    p.add_argument(
        "--poll-seconds", type=float, default=1.0, help="how often a paused apply checks for resume"
    )
    p.set_defaults(func=cmd_start)

    for action in ("pause", "resume", "cancel"):
        p = actions.add_parser(action, help=f"{action} a running staging apply (between partitions)")
        add_common_options(p)
        _rollout_arg(p)
        _by(p, f"asks to {action}")
        p.add_argument("--reason", default="", help="why (recorded in the rollout log)")
        p.set_defaults(func=cmd_control, action=action)

    p = with_config(actions.add_parser("status", help="a rollout's state, history, soak and gate"))
    _rollout_arg(p)
    p.set_defaults(func=cmd_status)

    p = actions.add_parser("list", help="all rollouts")
    add_common_options(p)
    p.add_argument("--dataset", help="only this dataset's rollouts")
    p.set_defaults(func=cmd_list)

    p = with_config(actions.add_parser("soak", help="evaluate soaking rollouts now (what the schedule runs)"))
    p.add_argument(
        "rollouts", nargs="*", metavar="ROLLOUT", help="the rollouts to evaluate (default: every soaking one)"
    )
    p.set_defaults(func=cmd_soak)

    p = with_config(actions.add_parser("promote", help="promote to production when the gate is open"))
    _rollout_arg(p)
    _by(p, "promotes")
    p.set_defaults(func=cmd_promote)

    p = with_config(actions.add_parser("rollback", help="roll back a rollout or a partition range"))
    p.add_argument(
        "rollout", nargs="?", metavar="ROLLOUT", help="the rollout to roll back (or --dataset --from --to)"
    )
    p.add_argument("--dataset", help="roll back a partition range of this dataset instead of a rollout")
    p.add_argument("--from", dest="first", metavar="KEY", help="first partition key of the range")
    p.add_argument("--to", dest="last", metavar="KEY", help="last partition key of the range (included)")
    p.add_argument("--stage", required=True, choices=("staging", "production"), help="which environment")
    _by(p, "rolls back")
    p.add_argument("--reason", required=True, help="why (recorded on the audit chain)")
    p.set_defaults(func=cmd_rollback)

    p = with_config(actions.add_parser("health", help="production health check and mini backfill plan"))
    p.add_argument("--dataset", required=True, help="the rollout dataset to check in production")
    p.add_argument("--launch", action="store_true", help="run the mini backfill it plans")
    p.set_defaults(func=cmd_health)

    for command, help_text in (
        ("approve", "approve a rollout for production"),
        ("reject", "reject a rollout"),
    ):
        p = with_config(sub.add_parser(command, help=help_text))
        _rollout_arg(p)
        p.add_argument(
            "--key", help="your private key file: the decision is signed with it (a listed approver's key)"
        )
        p.add_argument(
            "--statement", help="a decision already signed (pcbo.approval/v1 signed note) to record instead"
        )
        p.add_argument("--reason", help="why (signed, and recorded on the audit chain)")
        if command == "approve":
            p.add_argument("--decision-hash", help="the decision hash you approve (default: the staged one)")
        p.set_defaults(func=cmd_decide)
