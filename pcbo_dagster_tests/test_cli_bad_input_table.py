"""The `pcbo` command line against a careless operator: for each command family, a table of bad command
lines — a flag missing, one too many, a wrong type, a value out of range, an empty path, flags that
cannot both apply — each refused with one line on stderr naming the flag, field or variable, exit
status 2, no traceback, nothing on stdout and nothing written: the work directory, the home, its lake,
catalog and audit backup are compared file by file (a SQLite database by its rows) before and after.

Everything runs through the real CLI, each command in a process of its own: forked from one that
imported pcbo once (`pcbo_fork_runner`), which the module's ~140 commands would otherwise each pay.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster_tests.cli_runner import REPO_ROOT, PcboRun, tree_state
from pcbo_dagster_tests.pcbo_fork_runner import run_pcbo_forked as run_pcbo

DEMO_REQUEST = REPO_ROOT / "examples" / "demo_request.json"
DATASET = "demo-events"
FIRST_KEY = "20240101T000000Z"


def assert_refused(run: PcboRun, words: Sequence[str], before: dict[str, str], after: dict[str, str]) -> None:
    """Exit 2, one line on stderr saying invalid input and holding each of `words`, no traceback,
    nothing on stdout, nothing written."""
    assert run.status == 2, (run.status, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert "invalid input: " in lines[0] and "Traceback" not in run.stderr, run.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert run.document is None
    written = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert written == [], f"a refused command wrote {written}"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty work directory with a copy of the demo request (`req.json`); its home is `home`."""
    shutil.copyfile(DEMO_REQUEST, tmp_path / "req.json")
    return tmp_path


def refused_in(workdir: Path, args: Sequence[str], words: Sequence[str], **kwargs: Any) -> PcboRun:
    before = tree_state(workdir)
    run = run_pcbo(list(args), home=workdir / "home", cwd=workdir, **kwargs)
    assert_refused(run, words, before, tree_state(workdir))
    return run


# -- the command line argparse reads ---------------------------------------------------------------

ARGUMENT_ERRORS = [
    (["plan"], ["pcbo plan: ", "--input"]),
    (["dry-run", "--input"], ["--input", "expected one argument"]),
    (["execute", "--input", "req.json", "extra"], ["pcbo execute: ", "unrecognized arguments: extra"]),
    (["execute", "--input", "req.json", "--parallel", "two"], ["--parallel", "'two'"]),
    (["execute", "--input", "req.json", "--dagster-timeout", "soon"], ["--dagster-timeout"]),
    (["verify", "--min-witnesses", "2.5"], ["--min-witnesses"]),
    (["proof", "--dataset", DATASET, "--partition", "../x", "--id", "a"], ["--partition"]),
    (["proof", "--dataset", "../d", "--partition", FIRST_KEY, "--id", "a"], ["--dataset"]),
    (["proof", "--dataset", DATASET, "--partition", FIRST_KEY, "--from-version", "x"], ["--from-version"]),
    (["verify-proof"], ["--proof"]),
    (["rollback", "--dataset", DATASET], ["--run-id", "--partition"]),
    (
        ["rollback", "--dataset", DATASET, "--run-id", "r", "--partition", FIRST_KEY],
        ["--partition", "--run-id"],
    ),
    (["rollback", "--dataset", DATASET, "--partition", FIRST_KEY, "--version", "1.5"], ["--version"]),
    (["query", "--dataset", DATASET], ["SQL"]),
    (["query", "--dataset", DATASET, "SELECT 1", "--reader", "fast"], ["--reader", "'fast'"]),
    (["gc", "--dry-run", "now"], ["pcbo gc: ", "unrecognized arguments: now"]),
    (["validate-config", "a.yaml", "b.yaml"], ["unrecognized arguments: b.yaml"]),
    (["demo-data", "--dir"], ["--dir"]),
    (["rollout"], ["pcbo rollout: "]),
    (["rollout", "start", "--dataset", "d"], ["pcbo rollout start: ", "--from", "--to", "--by"]),
    (["rollout", "promote", "r"], ["--by"]),
    (["rollout", "rollback", "r", "--stage", "qa", "--by", "me", "--reason", "x"], ["--stage", "'qa'"]),
    (["reject", "r", "--decision-hash", "sha256:00"], ["pcbo reject: ", "--decision-hash"]),
    (["log", "prove-inclusion", "--dataset", DATASET, "--seq", "1.5"], ["--seq"]),
    (["log", "prove-consistency", "--dataset", DATASET], ["--from"]),
    (["witness", "serve", "--key", "k", "--db", "w.db", "--log-key", "v", "--port", "http"], ["--port"]),
    (["keys", "generate"], ["pcbo keys generate: ", "--name"]),
    (["evidence", "export", "--run", "../r"], ["--run"]),
    (["evidence", "verify", "--key", "v"], ["FILE"]),
    (["evidence", "verify", "ev.json", "--key", "v", "--min-approvals", "two"], ["--min-approvals", "'two'"]),
    (["serve", "--log-level", "loud"], ["--log-level"]),
    (
        ["token", "create", "--subject", "me", "--scope", "read", "--expires-in-days", "7.5"],
        ["--expires-in-days"],
    ),
    (["token", "revoke"], ["TOKEN_ID"]),
    ([], ["pcbo: "]),
]


@pytest.mark.parametrize(
    ("args", "words"), ARGUMENT_ERRORS, ids=[" ".join(a[:3]) for a, _ in ARGUMENT_ERRORS]
)
def test_a_command_line_argparse_refuses_is_one_line_naming_the_flag(workdir, args, words):
    """Not argparse's usage text and a second line: one line as for any other invalid input."""
    refused_in(workdir, args, words)


def test_a_refused_command_line_shows_no_secret_and_no_terminal_control(workdir):
    """A flag given to a command that takes none is shown in the message: without its URL's password,
    and without the escape sequences a terminal would act on."""
    run = refused_in(
        workdir,
        ["plan", "--input", "req.json", "--catalog", "postgresql://ops:hunter2@db/pcbo", "\x1b[2J"],
        ["unrecognized arguments: --catalog postgresql://[redacted]@db/pcbo", "\\x1b[2J"],
    )
    assert "hunter2" not in run.stderr and "\x1b" not in run.stderr


# -- where things go: the catalog URL --------------------------------------------------------------

CATALOG_ERRORS = [
    (["--catalog", "mysql://ops:hunter2@db/pcbo"], {}, ["--catalog", "sqlite or postgresql"]),
    (["--catalog", "not a url"], {}, ["--catalog", "not a database URL"]),
    (["--catalog", "sqlite://"], {}, ["--catalog", "in-memory"]),
    (["--catalog", "sqlite:///:memory:"], {}, ["--catalog", "in-memory"]),
    ([], {"PCBO_CATALOG_URL": "mysql://db/pcbo"}, ["PCBO_CATALOG_URL", "sqlite or postgresql"]),
    ([], {"PCBO_CATALOG_URL": "sqlite://"}, ["PCBO_CATALOG_URL", "in-memory"]),
]


@pytest.mark.parametrize("command", ["execute", "verify", "token"])
@pytest.mark.parametrize(("flags", "env", "words"), CATALOG_ERRORS)
def test_a_catalog_url_that_can_hold_no_catalog_is_invalid_input(workdir, command, flags, env, words):
    """A catalog URL of another database (exit 1 'internal error' before), or an in-memory one: an
    execute then wrote the lake and the audit backup and lost the catalog that describes them."""
    args = {
        "execute": ["execute", "--input", "req.json"],
        "verify": ["verify"],
        "token": ["token", "create", "--subject", "ops", "--scope", "read"],
    }[command]
    run = refused_in(workdir, [*args, *flags], words, env=env)
    assert "hunter2" not in run.stderr


# -- keys generate ---------------------------------------------------------------------------------


def test_a_key_named_beyond_ascii_is_written_and_loads(workdir):
    """A key name is any text without spaces or '+' (signed notes are UTF-8): `keys generate` wrote
    such a key as ASCII, failed with an internal error and left an empty key file behind, which
    then refused the next attempt as 'exists'."""
    made = run_pcbo(["keys", "generate", "--name", "ops.example/é"], home=workdir / "home", cwd=workdir)
    assert made.status == 0, made.stderr
    assert made.document["name"] == "ops.example/é"
    assert made.document["verifierKey"].startswith("ops.example/é+")
    shown = run_pcbo(["keys", "show", "--key", made.document["keyFile"]], home=workdir / "home", cwd=workdir)
    assert shown.status == 0, shown.stderr
    assert shown.document["verifierKey"] == made.document["verifierKey"]


def test_a_key_file_that_cannot_be_created_is_invalid_input(workdir):
    """A key name too long for a file name (the default key file is named after it): exit 1 before."""
    refused_in(workdir, ["keys", "generate", "--name", "k" * 300], ["--key-file", "cannot create"])


#: The verifier key of a log operator (a witness's --log-key).
VKEY = "ops.example/log+99098eb5+AROY9ixtGkV8UbpqS189vS9p/KkyFiGNyJl+QWvRfZPK"


def write_witness_key(workdir: Path) -> None:
    """A witness's private key in `workdir/w.key` (mode 0600)."""
    from pcbo_dagster.core.signed_note import signing_key_from_seed

    key = signing_key_from_seed("witness.example/w", bytes([7]) * 32)
    (workdir / "w.key").write_text(key.text + "\n")
    (workdir / "w.key").chmod(0o600)


# -- servers: where they listen ---------------------------------------------------------------------

LISTEN_ERRORS = [
    (["serve", "--host", ""], ["--host", "every interface"]),
    (["serve", "--host", "127.0.0.1\n"], ["--host"]),
    (["serve", "--port", "0"], ["--port", "1-65535"]),
    (["witness", "serve", "--port", "-1"], ["--port", "0-65535"]),
    (["witness", "serve", "--port", "70000"], ["--port", "0-65535"]),
    (["witness", "serve", "--host", ""], ["--host", "every interface"]),
]


@pytest.mark.parametrize(("args", "words"), LISTEN_ERRORS)
def test_a_server_address_that_is_none_is_refused_before_anything_is_opened(workdir, args, words):
    """An empty --host listened on every interface (and `pcbo serve` ran on); a witness's port out of
    range was an internal error after its database was created."""
    if args[0] == "witness":
        write_witness_key(workdir)
        args = [*args, "--key", "w.key", "--db", "w.db", "--log-key", VKEY]
    refused_in(workdir, args, words, timeout=60)


# -- rollouts: refused before any environment is opened --------------------------------------------


@pytest.fixture
def rollout_workdir(workdir: Path) -> Path:
    """`workdir` with the rollout tests' datasets config (`datasets.yaml`, dataset `sessions`) and its
    source; no home yet."""
    from pcbo_dagster_tests.test_rollout_cli import CONFIG

    records = [
        {"id": f"s-{h}-{n}", "occurredAt": f"2024-01-01T{h:02d}:{n * 10:02d}:00Z", "jurisdiction": "US"}
        for h in range(4)
        for n in range(3)
    ]
    (workdir / "sessions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (workdir / "datasets.yaml").write_text(CONFIG)
    return workdir


START = ["rollout", "start", "--config", "datasets.yaml", "--dataset", "sessions"]
RANGE = ["--from", "20240101T000000Z", "--to", "20240101T010000Z"]
ROLLBACK = ["rollout", "rollback", "--config", "datasets.yaml", "--stage", "staging"]
ROLLOUT_ERRORS = [
    ([*START, *RANGE, "--by", " "], ["--by"]),
    ([*START, *RANGE, "--by", "ops", "--name", "../x"], ["--name: ", "cannot name a rollout"]),
    ([*START, *RANGE, "--by", "ops", "--name", ""], ["--name: ", "cannot name a rollout"]),  # not the default
    ([*START, *RANGE, "--by", "ops", "--poll-seconds", "0"], ["--poll-seconds"]),
    ([*START, *RANGE, "--by", "ops", "--poll-seconds", "nan"], ["--poll-seconds"]),
    # the flag typed is named, after the command's own name as its parser's errors say it
    (
        [*START, *RANGE, "--by", "ops", "--partitions-per-minute", "-1"],
        ["pcbo rollout start: invalid input: --partitions-per-minute: ", "greater than 0"],
    ),
    (
        [*START, *RANGE, "--by", "ops", "--partitions-per-minute", "nan"],
        ["--partitions-per-minute: ", "finite number"],
    ),
    (
        [*START, *RANGE, "--by", "ops", "--records-per-minute", "inf"],
        ["--records-per-minute: ", "finite number"],
    ),
    ([*ROLLBACK, "--dataset", "sessions", *RANGE, "--by", "", "--reason", "bad data"], ["--by"]),
    ([*ROLLBACK, "--dataset", "sessions", *RANGE, "--by", "ops", "--reason", " "], ["--reason"]),
]


@pytest.mark.parametrize(("args", "words"), ROLLOUT_ERRORS)
def test_a_refused_rollout_start_or_rollback_creates_no_catalog(rollout_workdir, args, words):
    """These were checked after the production and staging environments were opened: each refusal
    left a home with two migrated catalogs."""
    refused_in(rollout_workdir, args, words)


# -- a home that holds a run -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work directory whose home holds the demo request's run (and its Iceberg table)."""
    root = tmp_path_factory.mktemp("cli-bad-input")
    shutil.copyfile(DEMO_REQUEST, root / "req.json")
    done = run_pcbo(["execute", "--input", "req.json"], home=root / "home", cwd=root)
    assert done.status == 0, done.stderr
    return root


@pytest.mark.parametrize("sql", ["", "   ", "-- nothing", ";"])
def test_a_query_with_no_statement_is_invalid_input(executed, sql):
    """DuckDB answers such text with no result: an internal error (exit 1) before."""
    refused_in(executed, ["query", "--dataset", DATASET, sql], ["SQL"])


# -- an empty path names the current directory --------------------------------------------------------

EMPTY_PATHS = [
    (["plan", "--input", ""], "--input"),
    (["execute", "--input", ""], "--input"),
    (["verify-proof", "--proof", ""], "--proof"),
    (["verify", "--trusted-checkpoint", "", "--key", VKEY], "--trusted-checkpoint"),
    (["verify", "--trusted-checkpoint", "cp.txt", "--key", ""], "--key"),
    (["log", "verify-proof", "--proof", "req.json", "--key", ""], "--key"),
    (["log", "verify-proof", "--proof", "req.json", "--key", VKEY, "--checkpoint", ""], "--checkpoint"),
    (["evidence", "verify", "", "--key", VKEY], "FILE"),
    (["evidence", "verify", "ev.json", "--key", VKEY, "--approver-key", ""], "--approver-key"),
    (["keys", "show", "--key", ""], "--key"),
    (["validate-config", ""], "FILE"),
    (["demo-data", "--dir", ""], "--dir"),
    (["demo-sql", "--dir", ""], "--dir"),
    (["rollout", "status", "r1", "--config", ""], "--config"),
    (["approve", "r1", "--statement", ""], "--statement"),
    (["approve", "r1", "--key", "", "--reason", "checked"], "--key"),
    (["witness", "serve", "--key", "", "--db", "w.db", "--log-key", VKEY], "--key"),
    (["witness", "serve", "--key", "w.key", "--db", "", "--log-key", VKEY], "--db"),
    (["witness", "serve", "--key", "w.key", "--db", "w.db", "--log-key", ""], "--log-key"),
]


@pytest.mark.parametrize(("args", "flag"), EMPTY_PATHS, ids=[f"{a[0]} {f}" for a, f in EMPTY_PATHS])
def test_an_empty_path_is_invalid_input_naming_its_flag(workdir, args, flag):
    """`Path("")` is `.`: an empty --input was 'cannot read : Is a directory', an empty --dir or
    validate-config FILE or --config silently meant the default (demo-data and demo-sql wrote it)."""
    (workdir / "cp.txt").write_text("not a checkpoint\n")
    write_witness_key(workdir)
    refused_in(workdir, args, [f"{flag}: is empty"])


# -- flags that cannot both apply ----------------------------------------------------------------------

CONFLICTS = [
    (
        [
            "proof",
            "--dataset",
            DATASET,
            "--partition",
            FIRST_KEY,
            "--id",
            "x",
            "--from-version",
            "1",
            "--to-version",
            "1",
        ],
        ["--id", "not both"],
    ),
    (
        ["execute", "--input", "req.json", "--server", "http://127.0.0.1:9", "--signing-key", "op.key"],
        ["--signing-key"],
    ),
    (
        ["execute", "--input", "req.json", "--server", "http://127.0.0.1:9", "--witness", "W http://w"],
        ["--witness"],
    ),
    (
        ["execute", "--input", "req.json", "--dagster", "http://127.0.0.1:9", "--parallel", "2"],
        ["--parallel"],
    ),
    (
        ["execute", "--input", "req.json", "--dagster", "http://127.0.0.1:9", "--signing-key", "op.key"],
        ["--signing-key"],
    ),
]


@pytest.mark.parametrize(("args", "words"), CONFLICTS)
def test_flags_that_cannot_both_apply_are_refused(executed, args, words):
    """A proof with --id and --from-version was a consistency proof, the --id ignored; --signing-key,
    --witness or --parallel with --server or --dagster were ignored (the other side signs, or not)."""
    refused_in(executed, args, words)


def test_a_rollout_rollback_given_a_rollout_and_a_range_is_refused(rollout_workdir):
    """The range was ignored and the whole rollout rolled back: refused, whatever the rollout."""
    refused_in(
        rollout_workdir,
        [*ROLLBACK, "r1", "--dataset", "sessions", *RANGE, "--by", "ops", "--reason", "one bad hour"],
        ["rollout", "not both"],
    )


# -- the audit endpoint --------------------------------------------------------------------------------

ENDPOINT_ERRORS = [
    (["--audit-endpoint", "ftp://ops:hunter2@audit.example/events"], {}, ["--audit-endpoint", "http(s)"]),
    (["--audit-endpoint", "http://audit.example:99999/events"], {}, ["--audit-endpoint", "invalid"]),
    ([], {"PCBO_AUDIT_ENDPOINT": "audit.example/events"}, ["PCBO_AUDIT_ENDPOINT", "http(s)"]),
    ([], {"PCBO_AUDIT_ENDPOINT": "http://audit example/events"}, ["PCBO_AUDIT_ENDPOINT", "space"]),
]


@pytest.mark.parametrize(("flags", "env", "words"), ENDPOINT_ERRORS)
def test_an_audit_endpoint_events_cannot_be_sent_to_is_invalid_input(workdir, flags, env, words):
    """It was found once the home and its catalog were made: an internal error (exit 1) that left a
    migrated catalog (and its -wal and -shm files) behind."""
    run = refused_in(workdir, ["execute", "--input", "req.json", *flags], words, env=env)
    assert "hunter2" not in run.stderr


# -- the Iceberg catalog of a table that names none -------------------------------------------------------

ICEBERG_CATALOG_ERRORS = [
    ("not a url", "not a sqlite://"),
    ("mysql://ops:hunter2@db/iceberg", "not a sqlite://"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
    ("sqlite:///iceberg.db\n", "surrounding whitespace"),
]


@pytest.mark.parametrize(("url", "words"), ICEBERG_CATALOG_ERRORS)
def test_an_iceberg_catalog_url_that_can_hold_no_table_is_invalid_input(workdir, url, words):
    """PCBO_ICEBERG_CATALOG_URL was read when the demo's table was published, after the lake held the
    run's partitions: exit 1 with the lake written; an in-memory one lost the table's metadata."""
    run = refused_in(
        workdir,
        ["execute", "--input", "req.json"],
        ["PCBO_ICEBERG_CATALOG_URL", words],
        env={"PCBO_ICEBERG_CATALOG_URL": url},
    )
    assert "hunter2" not in run.stderr


# -- SQL targets to reach ------------------------------------------------------------------------------

TARGET_URL_ERRORS = [
    (["--target-url", "postgres:/ops@db/pcbo"], {}, ["--target-url", "not a database URL"]),
    (["--target-url", "postgresql://ops:hunter2@db:54x2/pcbo"], {}, ["--target-url", "not a database URL"]),
    (["--target-url", "mysql://ops:hunter2@db/pcbo"], {}, ["--target-url", "postgresql:// or sqlite:///"]),
    (["--target-url", ""], {}, ["--target-url", "is empty"]),
    ([], {"PCBO_SQL_TARGET_URLS": "sqlite:///t.db db.example:5432"}, ["PCBO_SQL_TARGET_URLS"]),
]


@pytest.mark.parametrize("command", ["verify", "rollback"])
@pytest.mark.parametrize(("flags", "env", "words"), TARGET_URL_ERRORS)
def test_a_sql_target_url_that_names_no_database_is_invalid_input(executed, command, flags, env, words):
    """Such a URL was skipped when matched against the location the chain records (the recorded
    location used instead, the typo never reported): verify went on, rollback rolled back."""
    args = ["verify"] if command == "verify" else ["rollback", "--dataset", DATASET, "--partition", FIRST_KEY]
    run = refused_in(executed, [*args, *flags], words, env=env)
    assert "hunter2" not in run.stderr


# -- bytes that are not UTF-8 ----------------------------------------------------------------------------

NOT_UTF8 = "\udcff\udcfe"  # the bytes 0xff 0xfe on the command line, as Python holds them
UNDECODABLE = [
    (["rollback", "--dataset", DATASET, "--partition", FIRST_KEY, "--reason", NOT_UTF8], "--reason"),
    (["query", "--dataset", DATASET, f"SELECT '{NOT_UTF8}'"], "SQL"),
    (["rollout", "list", "--dataset", NOT_UTF8], "--dataset"),
    (["keys", "generate", "--name", f"ops.example/{NOT_UTF8}"], "--name"),
    (["token", "create", "--subject", NOT_UTF8, "--scope", "read"], "--subject"),
    (["verify", "--target-url", f"sqlite:///{NOT_UTF8}.db"], "--target-url"),
]


@pytest.mark.parametrize(("args", "flag"), UNDECODABLE, ids=[f for _, f in UNDECODABLE])
def test_an_argument_that_is_not_utf8_is_invalid_input_naming_its_flag(executed, args, flag):
    """Such bytes failed later as an internal error (exit 1): a rollback's reason as its audit event
    was canonicalized, a query's SQL or a key's name as they were encoded, a rollout list's dataset as
    the catalog was asked."""
    refused_in(executed, args, [f"argument {flag}: is not UTF-8 text (byte 0xff)"])


@pytest.mark.parametrize("variable", ["PCBO_HOME", "PCBO_LAKE_URL", "PCBO_AUDIT_DIR", "PCBO_CATALOG_URL"])
def test_a_location_variable_that_is_not_utf8_is_invalid_input(workdir, variable):
    """A home or lake whose path is not UTF-8 failed as an internal error (exit 1) once the first
    audit event was canonicalized: the home (elsewhere) or catalog and audit backup already written."""
    where = workdir / f"w{NOT_UTF8}"
    value = f"sqlite:///{where}.db" if variable == "PCBO_CATALOG_URL" else str(where)
    refused_in(
        workdir, ["execute", "--input", "req.json"], [variable, "is not UTF-8 text"], env={variable: value}
    )


# -- a request run elsewhere: --server and --dagster -------------------------------------------------------

REMOTE_ERRORS = [
    (["plan", "--input", "req.json", "--server", ""], ["--server", "is empty"]),
    (["dry-run", "--input", "req.json", "--server", ""], ["--server", "is empty"]),
    (["execute", "--input", "req.json", "--server", ""], ["--server", "is empty"]),
    (["execute", "--input", "req.json", "--server", "pcbo server.example"], ["--server", "white space"]),
    (["execute", "--input", "req.json", "--dagster", ""], ["--dagster", "is empty"]),
    (
        ["execute", "--input", "req.json", "--dagster", "http://127.0.0.1:9", "--dagster-timeout", "nan"],
        ["--dagster-timeout"],
    ),
    (
        ["execute", "--input", "req.json", "--dagster", "http://127.0.0.1:9", "--dagster-timeout", "inf"],
        ["--dagster-timeout"],
    ),
    (
        ["execute", "--input", "req.json", "--server", "http://127.0.0.1:9", "--home", ""],
        ["--home", "does not apply"],
    ),
]


@pytest.mark.parametrize(("args", "words"), REMOTE_ERRORS)
def test_a_remote_run_that_names_no_remote_is_refused_not_run_here(workdir, args, words):
    """`--server "$PCBO_SERVER"` with the variable unset (an empty URL) ran the request here, an
    execute writing a local lake, catalog and audit backup; `--dagster ''` alike. A server URL with a
    space was an internal error; --dagster-timeout nan or inf an exit 1 saying 'None'."""
    refused_in(workdir, args, words, env={"PCBO_TOKEN": "tok_0123456789abcdef.secret"}, timeout=60)


def test_an_empty_decision_hash_approves_nothing(rollout_workdir):
    """`pcbo approve R --decision-hash "$HASH"` with the variable unset signed an approval of whatever
    decision hash was staged then, not the one the approver meant to pin: refused, nothing recorded."""
    from pcbo_dagster_tests.approver_keys import CY, key_file

    key_file(rollout_workdir, CY)
    started = run_pcbo(
        [*START, *RANGE, "--by", "ana", "--name", "day1", "--partitions-per-minute", "100000"],
        home=rollout_workdir / "home",
        cwd=rollout_workdir,
    )
    assert started.status == 0, started.stderr
    args = ["approve", "day1", "--config", "datasets.yaml", "--key", "cy.key", "--reason", "checked"]
    refused_in(rollout_workdir, [*args, "--decision-hash", ""], ["--decision-hash", "is empty"])
    approved = run_pcbo(args, home=rollout_workdir / "home", cwd=rollout_workdir)
    assert approved.status == 0, approved.stderr
    assert approved.document["decisionHash"] == started.document["execute"]["decisionHash"]
