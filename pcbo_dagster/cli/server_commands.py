"""`pcbo serve` and `pcbo token create|list|revoke` (wired into `cli.build_parser`):

    pcbo serve [--host 127.0.0.1] [--port 8080]        the HTTP API on the engine settings' home
    pcbo token create --subject WHO --scope S [--scope S ...] [--dataset D ...] [--expires-in-days N]
    pcbo token list
    pcbo token revoke TOKEN_ID

A token is printed once, by `create`; the catalog keeps only its SHA-256.
"""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from typing import Any

from pcbo_dagster.cli.common import add_common_options, check_listen_address, engine_settings, name_arg
from pcbo_dagster.core.errors import InvalidInput


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from pcbo_dagster.server.app import serve
    except ImportError as exc:
        raise InvalidInput(
            "serve", f"the server needs the 'server' extra: pip install 'pcbo_dagster[server]' ({exc.name})"
        ) from None
    from pcbo_dagster.server.config import ServerConfig

    check_listen_address(args.host, args.port)
    config = ServerConfig.from_environment(engine_settings(args))
    serve(config, args.host, args.port, log_level=args.log_level)
    return {"status": "stopped", "host": args.host, "port": args.port}


def _catalog(args: argparse.Namespace, create: bool) -> Any:
    from pcbo_dagster.catalog import CatalogStore

    settings = engine_settings(args)
    catalog = CatalogStore(settings.catalog_url)
    if not create and catalog.is_missing_sqlite_file():
        raise InvalidInput(settings.catalog_field, f"nothing here: no pcbo catalog at {catalog.url}")
    settings.home.mkdir(parents=True, exist_ok=True)
    catalog.migrate()
    return catalog


def _token_document(row: dict[str, Any]) -> dict[str, Any]:
    from pcbo_dagster.server.status import instant

    return {
        "tokenId": row["token_id"],
        "subject": row["subject"],
        "scopes": row["scopes"],
        "datasets": row["datasets"],
        "createdAt": instant(row["created_at"]),
        "expiresAt": instant(row["expires_at"]),
        "revokedAt": instant(row["revoked_at"]),
    }


def cmd_token_create(args: argparse.Namespace) -> dict[str, Any]:
    from pcbo_dagster.catalog.schema import TOKEN_SCOPES
    from pcbo_dagster.io.clock import utc_now

    subject = (args.subject or "").strip()
    if not subject or len(subject) > 255 or not subject.isprintable():
        raise InvalidInput("--subject", "say whose token it is (printable, at most 255 characters)")
    for scope in args.scope:
        if scope not in TOKEN_SCOPES:
            raise InvalidInput("--scope", f"must be one of {', '.join(TOKEN_SCOPES)}, not {scope!r}")
    if args.expires_in_days is not None and not 0 < args.expires_in_days <= 3650:
        raise InvalidInput("--expires-in-days", "must be between 1 and 3650")
    expires = None if args.expires_in_days is None else utc_now() + timedelta(days=args.expires_in_days)
    catalog = _catalog(args, create=True)
    try:
        row, secret = catalog.create_token(subject, args.scope, args.dataset or None, expires)
    finally:
        catalog.close()
    return {**_token_document(row), "token": secret}


def cmd_token_list(args: argparse.Namespace) -> dict[str, Any]:
    catalog = _catalog(args, create=False)
    try:
        return {"tokens": [_token_document(row) for row in catalog.tokens()]}
    finally:
        catalog.close()


def cmd_token_revoke(args: argparse.Namespace) -> dict[str, Any]:
    if not re.fullmatch(r"tok_[0-9a-f]{16}", args.token_id):
        raise InvalidInput("TOKEN_ID", "a token id looks like tok_0123456789abcdef (`pcbo token list`)")
    catalog = _catalog(args, create=False)
    try:
        row = catalog.revoke_token(args.token_id)
    finally:
        catalog.close()
    if row is None:
        raise InvalidInput("TOKEN_ID", f"no token {args.token_id} (`pcbo token list`)")
    return _token_document(row)


def add_server_commands(sub: Any) -> None:
    """Add `serve` and `token` to the `pcbo` parser."""
    p = sub.add_parser("serve", help="serve the HTTP API (plan, dry-run, execute, stream, audit, commands)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="TCP port to listen on (default 8080)")
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="log level of the server's logs (default info; access logs are info)",
    )
    add_common_options(p)
    p.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="bearer tokens of the HTTP API: create, list, revoke")
    actions = token.add_subparsers(dest="token_command", required=True)
    p = actions.add_parser("create", help="create a token and print it (once; the catalog keeps its hash)")
    p.add_argument(
        "--subject", required=True, help="whose token it is: the actor of every write made with it"
    )
    p.add_argument(
        "--scope",
        action="append",
        required=True,
        help="read, plan, execute, approve or admin (repeat for several; admin implies all)",
    )
    p.add_argument(
        "--dataset",
        action="append",
        type=name_arg,
        help="limit the token to this dataset (repeat for several; default every dataset)",
    )
    p.add_argument("--expires-in-days", type=int, metavar="N", help="the token stops working after N days")
    add_common_options(p, signs=False)
    p.set_defaults(func=cmd_token_create)
    p = actions.add_parser("list", help="list tokens (never the tokens themselves)")
    add_common_options(p, signs=False)
    p.set_defaults(func=cmd_token_list)
    p = actions.add_parser("revoke", help="revoke a token: it stops working at once")
    p.add_argument("token_id", metavar="TOKEN_ID", help="the token's id (tok_..., from `pcbo token list`)")
    add_common_options(p, signs=False)
    p.set_defaults(func=cmd_token_revoke)
