"""Bad input never costs more than a bounded amount of memory, never a traceback, and creates nothing;
secrets stay secret (issue 10, properties 7 and 8). Through the real `pcbo` command: each in a process
of its own, forked from one that imported pcbo once (`pcbo_fork_runner`), but a closed pipe's and a
memory-limited run's, which start their own interpreter."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pcbo_dagster.core.errors import InvalidInput
from pcbo_dagster.core.request_model import MAX_JSON_DEPTH, nested_deeper_than
from pcbo_dagster.datasets.config import MAX_YAML_DEPTH, parse_datasets_config
from pcbo_dagster.io.redaction import redact_url, scrub_text
from pcbo_dagster_tests.cli_runner import REPO_ROOT, load_generator, pcbo_env, write_request
from pcbo_dagster_tests.pcbo_fork_runner import run_pcbo_forked as run_pcbo


def _request(tmp_path: Path, **changes: object) -> Path:
    request = load_generator().make_request(records=20, partitions=2, seed=3, run_id="bad-input-001")
    request.update(changes)
    return write_request(tmp_path / "request.json", request)


def _jsonl_request(tmp_path: Path, source: Path) -> Path:
    request = load_generator().make_request(records=1, partitions=2, seed=3, run_id="bad-input-002")
    request.pop("sourceRecords")
    request["source"] = {"uri": str(source), "format": "jsonl"}
    return write_request(tmp_path / "request.json", request)


def assert_refused(run, field: str, home: Path) -> None:  # noqa: ANN001
    assert run.status == 2, (run.status, run.stderr)
    assert field in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not home.exists(), "a command refused for bad input created its home"


# -- bounded input ---------------------------------------------------------------------------------


def test_a_jsonl_line_longer_than_the_limit_is_invalid_input(tmp_path):
    source = tmp_path / "records.jsonl"
    source.write_text(json.dumps({"id": "a", "pad": "x" * 5000}) + "\n")
    home = tmp_path / "home"
    run = run_pcbo(
        ["execute", "--input", _jsonl_request(tmp_path, source)],
        home=home,
        env={"PCBO_MAX_LINE_BYTES": "1024"},
    )
    assert_refused(run, "source", home)
    assert "longer than 1024 bytes" in run.stderr


@pytest.mark.parametrize("cells", ["one", "many"])
def test_a_csv_row_spanning_lines_longer_than_the_limit_is_invalid_input(tmp_path, cells):
    """Red-team finding: `PCBO_MAX_LINE_BYTES` bounded each physical line of a CSV source, not a row:
    a quoted cell holding line ends, or a row of quoted cells each holding one, ran on over lines each
    under the limit, so one row (one cell, or millions of cells, built before their count was
    checked) grew with the file. A row is bounded as a line is, found before it is all read."""
    source = tmp_path / "records.csv"
    row = '"' + "x\n" * 400 + '"' if cells == "one" else ",".join(['"x\n"'] * 1000)
    source.write_text(f"id,occurredAt,note\nr1,2024-01-01T00:10:00Z,{row}\n")
    request = load_generator().make_request(records=1, partitions=2, seed=3, run_id="bad-input-003")
    request.pop("sourceRecords")
    request["source"] = {"uri": str(source), "format": "csv"}
    home = tmp_path / "home"
    run = run_pcbo(
        ["execute", "--input", write_request(tmp_path / "request.json", request)],
        home=home,
        env={"PCBO_MAX_LINE_BYTES": "512"},
    )
    assert_refused(run, "source", home)
    assert "row at byte 19 is longer than 512 bytes" in run.stderr, run.stderr


@pytest.mark.parametrize("where", ["source", "sourceRecords"])
def test_records_naming_more_fields_than_the_limit_are_invalid_input(tmp_path, where):
    """Red-team finding: every field the added records name is a column of the lake's files, so one
    line of a JSONL source naming 150,000 fields (2 MB) took an execute of 1 GB and 19 s and wrote a
    46 MB parquet file and a 9 MB manifest (about 6 KB of memory a field: a 64 MiB line, well within
    PCBO_MAX_LINE_BYTES, names millions). The records of a request may name at most
    `PCBO_MAX_RECORD_FIELDS` fields between them (default 10,000): dry-run and execute alike refuse
    more, nothing written."""
    from pcbo_dagster.core.record_table import DEFAULT_MAX_RECORD_FIELDS as MAX_RECORD_FIELDS

    request = load_generator().make_request(records=2, partitions=2, seed=3, run_id="bad-input-004")
    wide = dict(request["sourceRecords"][0])
    wide.update({f"k{i}": 0 for i in range(MAX_RECORD_FIELDS)})  # with its own, past the limit
    request["sourceRecords"][0] = wide
    if where == "source":
        source = tmp_path / "records.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in request.pop("sourceRecords")))
        request["source"] = {"uri": str(source), "format": "jsonl"}
    path = write_request(tmp_path / "request.json", request)
    home = tmp_path / "home"
    for command in ("dry-run", "execute"):
        run = run_pcbo([command, "--input", path], home=home)
        assert_refused(run, where, home)
        assert f"more than {MAX_RECORD_FIELDS} fields" in run.stderr, run.stderr


def test_the_fields_limit_is_the_operators(tmp_path):
    """`PCBO_MAX_RECORD_FIELDS` sets the limit: records naming n fields between them are accepted at
    n and refused at n - 1; a value that is not a positive whole number is invalid input naming it."""
    request = load_generator().make_request(records=4, partitions=2, seed=3, run_id="bad-input-005")
    named = len({name for record in request["sourceRecords"] for name in record})
    path = write_request(tmp_path / "request.json", request)
    accepted = run_pcbo(
        ["dry-run", "--input", path], home=tmp_path / "h0", env={"PCBO_MAX_RECORD_FIELDS": str(named)}
    )
    assert accepted.status == 0, accepted.stderr
    home = tmp_path / "home"
    for value, field, message in (
        (str(named - 1), "sourceRecords", f"more than {named - 1} fields"),
        ("0", "PCBO_MAX_RECORD_FIELDS", "at least 1"),
    ):
        run = run_pcbo(["execute", "--input", path], home=home, env={"PCBO_MAX_RECORD_FIELDS": value})
        assert_refused(run, field, home)
        assert message in run.stderr, run.stderr


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "directory"])
def test_a_source_that_never_ends_is_invalid_input(tmp_path, kind):
    if kind == "dev_zero":
        source = Path("/dev/zero")
    elif kind == "fifo":
        source = tmp_path / "pipe.jsonl"
        os.mkfifo(source)
    else:
        source = tmp_path / "dir.jsonl"
        source.mkdir()
        (source / "part.jsonl").write_text("")
    home = tmp_path / "home"
    run = run_pcbo(["dry-run", "--input", _jsonl_request(tmp_path, source)], home=home, timeout=60)
    if kind == "directory":  # a directory source is read as its files: here an empty one, fine
        assert run.status == 0, run.stderr
        return
    assert_refused(run, "source.uri", home)
    assert "not a regular file" in run.stderr


def test_nesting_deeper_than_the_limit_is_invalid_input(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"runId": "x", "metadata": ' + "[" * 50_000 + "]" * 50_000 + "}")
    home = tmp_path / "home"
    assert_refused(run_pcbo(["execute", "--input", path], home=home), "request", home)


def _nested(depth: int) -> str:
    """JSON arrays nested `depth` levels (0: a number)."""
    return "[" * depth + "]" * depth if depth else "0"


@pytest.mark.parametrize("depth", [2, 3, 500, 899, 900, 901, 1000, 100_000])
def test_a_request_nested_up_to_the_bound_runs_and_one_level_more_is_invalid_input(tmp_path, depth):
    """`MAX_JSON_DEPTH` levels in the whole request (here: the request, `metadata`, then arrays) run
    through execute (the metadata kept in the catalog); one more is exit 2, at any depth, never a
    `RecursionError`."""
    request = _request(tmp_path, metadata={"x": "DEEP"})
    request.write_text(request.read_text().replace('"DEEP"', _nested(depth - 2)))
    home = tmp_path / "home"
    run = run_pcbo(["execute", "--input", request], home=home)
    if depth > MAX_JSON_DEPTH:
        assert_refused(run, "request", home)
        assert f"nest at most {MAX_JSON_DEPTH} levels" in run.stderr
        return
    assert run.status == 0 and "Traceback" not in run.stderr, run.stderr
    with sqlite3.connect(home / "catalog.db") as db:
        (stored,) = db.execute("SELECT metadata FROM runs WHERE run_id = 'bad-input-001'").fetchone()
    assert stored == '{"x":' + _nested(depth - 2) + "}"


@pytest.mark.parametrize("depth", [900, 901])
def test_a_source_line_nested_up_to_the_bound_is_read_and_one_level_more_is_invalid_input(tmp_path, depth):
    source = tmp_path / "records.jsonl"
    record = json.dumps({"id": "a", "occurredAt": "2024-01-01T00:10:00Z", "consentGranted": True, "x": 0})
    source.write_text(record.replace("0}", _nested(depth - 1) + "}") + "\n")
    home = tmp_path / "home"
    run = run_pcbo(["execute", "--input", _jsonl_request(tmp_path, source)], home=home)
    if depth > MAX_JSON_DEPTH:
        assert_refused(run, "source line 1", home)
    else:
        assert run.status == 0 and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize(
    ("text", "deeper"),
    [
        ("[]", False),
        (_nested(900), False),
        (_nested(901), True),
        # brackets in strings, escaped quotes and backslashes do not count
        ('["[[[[", "\\"[[[[", "\\\\", ' + _nested(899) + "]", False),
        ('["]]]]]]", ' + _nested(900) + "]", True),
        ('{"a\\\\": "\\\\\\"]]]]", "b": ' + _nested(900) + "}", True),
        ("[" + '"[",' * 2000 + "1]", False),
    ],
)
def test_nesting_is_counted_outside_strings(text, deeper):
    assert nested_deeper_than(text.encode(), MAX_JSON_DEPTH) is deeper
    if len(text) < 20_000 and not deeper:
        json.loads(text)  # the cases are valid JSON


@pytest.mark.parametrize("depth", [1, 100, 101, 600, 100_000])
def test_a_datasets_config_nested_past_its_bound_is_invalid_input(tmp_path, depth):
    """A datasets config nests at most `MAX_YAML_DEPTH` levels (flow or block style): deeper is exit 2
    naming the config, not a `RecursionError`."""
    config = tmp_path / "datasets.yaml"
    config.write_text("datasets: []\nextra: " + _nested(depth - 1) + "\n")
    run = run_pcbo(["validate-config", config], cwd=tmp_path)
    assert run.status == 2 and "Traceback" not in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    if depth > MAX_YAML_DEPTH:
        assert f"config: not valid YAML at line 2, column {MAX_YAML_DEPTH + 7}" in run.stderr
        assert f"nested more than {MAX_YAML_DEPTH} levels" in run.stderr
    else:
        assert "nested more than" not in run.stderr and "datasets config" in run.stderr  # parsed
    block = "".join("  " * i + "-\n" for i in range(depth if depth < 1000 else MAX_YAML_DEPTH + 1))
    with pytest.raises(InvalidInput) as refused:
        parse_datasets_config(block)
    assert ("nested more than" in refused.value.message) is (min(depth, MAX_YAML_DEPTH + 1) > MAX_YAML_DEPTH)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PCBO_AUDIT_ATTEMPTS", "three"),
        ("PCBO_AUDIT_INITIAL_WAIT", "nan"),
        ("PCBO_LEASE_WAIT_SECONDS", "-1"),
        ("PCBO_PARALLEL", "0"),
        ("PCBO_SOURCE_BATCH", "lots"),
        ("PCBO_MAX_LINE_BYTES", "1e9"),
        ("PCBO_LAKE_URL", "/tmp/lake\n"),
        ("PCBO_HOME", " /tmp/home"),
    ],
)
def test_environment_variables_with_bad_values_are_invalid_input(tmp_path, variable, value):
    request = _request(tmp_path)
    home = tmp_path / "home"
    env = {variable: value}
    if variable == "PCBO_SOURCE_BATCH" or variable == "PCBO_MAX_LINE_BYTES":
        source = tmp_path / "records.jsonl"
        source.write_text(json.dumps({"id": "a", "occurredAt": "2024-01-01T00:00:00Z"}) + "\n")
        request = _jsonl_request(tmp_path, source)
    if variable == "PCBO_LEASE_WAIT_SECONDS":
        # read when the lease is taken: after the home is made, so only the message is checked here
        run = run_pcbo(["execute", "--input", request], home=home, env=env)
        assert run.status == 2 and variable in run.stderr and "Traceback" not in run.stderr
        return
    run = run_pcbo(
        ["execute", "--input", request], home=None if variable == "PCBO_HOME" else home, env=env, cwd=tmp_path
    )
    assert_refused(run, variable, home)


@pytest.mark.parametrize("flag", ["--home", "--lake", "--audit-dir", "--output"])
def test_a_path_with_a_trailing_newline_is_invalid_input(tmp_path, flag):
    home = tmp_path / "home"
    args = ["execute", "--input", str(_request(tmp_path))]
    if flag == "--home":
        args += ["--home", f"{home}\n"]
    else:
        args += ["--home", str(home), flag, str(tmp_path / "x") + "\n"]
    run = run_pcbo(args, cwd=tmp_path)
    assert_refused(run, flag, home)


def test_a_missing_output_directory_is_found_before_any_work(tmp_path):
    home = tmp_path / "home"
    run = run_pcbo(
        [
            "execute",
            "--input",
            _request(tmp_path),
            "--home",
            home,
            "--output",
            tmp_path / "no" / "such" / "out.json",
        ]
    )
    assert_refused(run, "--output", home)


@pytest.mark.parametrize(
    "args",
    [
        ["verify"],
        ["verify", "--repair"],
        ["rollback", "--dataset", "events", "--run-id", "r1"],
        ["gc"],
    ],
)
def test_commands_with_nothing_to_act_on_create_nothing(tmp_path, args):
    home = tmp_path / "home"
    assert_refused(run_pcbo(args, home=home), "--home", home)


@pytest.mark.parametrize("given", ["--catalog", "PCBO_CATALOG_URL"])
def test_a_missing_catalog_given_by_flag_or_variable_is_named_as_given(tmp_path, given):
    """Walk finding: `pcbo verify --catalog sqlite:///missing.db` said `--home: nothing here`, naming a
    flag the user had not given; the flag or variable the catalog came from is named."""
    home = tmp_path / "home"
    url = f"sqlite:///{tmp_path / 'missing.db'}"
    flags, env = (["--catalog", url], {}) if given == "--catalog" else ([], {given: url})
    run = run_pcbo(["verify", *flags], home=home, env=env)
    assert_refused(run, f"invalid input: {given}: nothing here", home)
    assert not (tmp_path / "missing.db").exists()


def test_a_lake_that_cannot_be_written_is_one_line_and_exit_1(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run = run_pcbo(
        ["execute", "--input", _request(tmp_path), "--lake", blocker / "lake"], home=tmp_path / "home"
    )
    assert run.status == 1, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr


def _s3_down() -> dict[str, str]:
    """An S3 endpoint nobody answers (a loopback port just freed), dummy credentials, one attempt."""
    pytest.importorskip("s3fs")
    from pcbo_dagster_tests.loopback import free_port
    from pcbo_dagster_tests.object_store_servers import S3_ENV_BASE

    return {**S3_ENV_BASE, "PCBO_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"}


def test_an_s3_lake_whose_endpoint_is_down_is_one_line_and_exit_1(tmp_path):
    """botocore's EndpointConnectionError is not an OSError: still the one line of a store that went
    away — the store named, never a finding — and the traceback only with PCBO_DEBUG=1."""
    env = {**_s3_down(), "PCBO_LAKE_URL": "s3://bucket/lake"}
    args = ["execute", "--input", _request(tmp_path)]
    run = run_pcbo(args, home=tmp_path / "home", env=env)
    assert run.status == 1, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith("pcbo execute: store unavailable: s3://bucket/lake could not be read ("), (
        run.stderr
    )
    assert "EndpointConnectionError: Could not connect to the endpoint" in run.stderr
    assert "nothing was concluded from it" in run.stderr
    debug = run_pcbo(args, home=tmp_path / "home", env={**env, "PCBO_DEBUG": "1"})
    assert debug.status == 1 and "Traceback" in debug.stderr and "EndpointConnectionError" in debug.stderr


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        ("s3://pcbo-test-lake/records.jsonl", "EndpointConnectionError"),
        ("s3://bad_bucket!/r.jsonl", "ParamValidationError"),
    ],
)
def test_an_s3_source_that_cannot_be_read_is_invalid_input(tmp_path, uri, error):
    request = load_generator().make_request(records=1, partitions=2, seed=3, run_id="s3-source-001")
    request.pop("sourceRecords")
    request["source"] = {"uri": uri, "format": "jsonl"}
    home = tmp_path / "home"
    run = run_pcbo(
        ["plan", "--input", write_request(tmp_path / "r.json", request)], home=home, env=_s3_down()
    )
    assert_refused(run, "source.uri", home)
    assert f"source.uri: cannot be read: {error}" in run.stderr


def test_an_unexpected_error_is_one_line_without_secrets_and_exit_1(tmp_path, monkeypatch, capsys):
    """The last resort of `pcbo`: an error nobody foresaw (here injected) is one line through the
    redaction, exit 1; PCBO_DEBUG=1 lets it through with its traceback."""
    from pcbo_dagster.cli.main import main
    from pcbo_dagster.datasets import config

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot load postgresql://usr1:CatchAllSecret@db/x?token=tok9\nsecond line")

    monkeypatch.setattr(config, "load_datasets_config_from_env", broken)
    monkeypatch.delenv("PCBO_DEBUG", raising=False)
    assert main(["validate-config", str(tmp_path / "datasets.yaml")]) == 1
    err = capsys.readouterr().err
    assert err == (
        "pcbo validate-config: internal error (RuntimeError: cannot load postgresql://[redacted]@db/x?"
        "[redacted]); PCBO_DEBUG=1 shows the traceback\n"
    )
    monkeypatch.setenv("PCBO_DEBUG", "1")
    with pytest.raises(RuntimeError, match="CatchAllSecret"):
        main(["validate-config", str(tmp_path / "datasets.yaml")])


def test_a_closed_pipe_is_one_line_and_exit_1(tmp_path):
    """`pcbo dry-run | head -c 10`: the reader goes away; pcbo stops with one line and exit 1. (The
    document is far larger than a pipe's buffer, so the write meets the closed pipe.)"""
    big = load_generator().make_request(records=20_000, partitions=24, seed=3, run_id="bad-input-pipe")
    request = write_request(tmp_path / "big.json", big)
    proc = subprocess.run(
        [
            "bash",
            "-c",
            f"{sys.executable} -m pcbo_dagster.cli.main dry-run --input {request} | head -c 10; "
            'echo " ${PIPESTATUS[0]}"',
        ],
        env=pcbo_env(tmp_path / "home"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.endswith(" 1\n"), (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "output was closed" in proc.stderr


# -- secrets stay secret -------------------------------------------------------------------------------

URL_SHAPES = [
    ("postgresql://pcbo:s3cret@db:5432/pcbo", "postgresql://db:5432/pcbo"),
    ("postgresql://pcbo:pa/ss@db/pcbo", "postgresql://db/pcbo"),
    ("postgresql://pcbo:p@ss@db/pcbo", "postgresql://db/pcbo"),
    ("postgresql+psycopg://u:p@h/db?sslmode=require&password=x", "postgresql+psycopg://h/db?[redacted]"),
    ("https://tok3n@hooks.example.com/pas", "https://hooks.example.com/pas"),
    ("https://hooks.example.com/pas?sig=abc", "https://hooks.example.com/pas?[redacted]"),
    ("https://hooks.example.com/pas#token=abc", "https://hooks.example.com/pas?[redacted]"),
    ("https://user:pass@example.com", "https://example.com"),
    ("http://[::1]:8080/x?q=1", "http://[::1]:8080/x?[redacted]"),
    ("s3://AKIAEXAMPLE:secretkey@bucket/prefix", "s3://bucket/prefix"),
    ("s3://AKIAEXAMPLE:pa?ss@bucket/prefix", "s3://bucket/prefix"),
    ("https://user:p#ss@example.com/x", "https://example.com/x"),
    ("s3://user:pa/s?s@bucket/x", "s3://bucket/x?[redacted]"),
    # an `@` in a query: what follows it is shown as the host (a wrong host, never a secret)
    ("https://hooks.example.com/n?to=ops@example.com", "https://example.com?[redacted]"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("gs://bucket/p?x-goog-signature=1", "gs://bucket/p?[redacted]"),
    ("sqlite:////var/pcbo/catalog.db", "sqlite:////var/pcbo/catalog.db"),
    ("/data/lake", "/data/lake"),
    ("file:///data/lake", "file:///data/lake"),
]


@pytest.mark.parametrize(("url", "shown"), URL_SHAPES)
def test_one_redaction_for_every_url_shape(url, shown):
    assert redact_url(url) == shown
    secrets = ("s3cret", "pa/ss", "p@ss", "password=x", "tok3n", "sig=abc", "token=abc", "secretkey", "pa?ss")
    for secret in (*secrets, "p#ss", "pa/s?s", "to=ops"):
        assert secret not in redact_url(url)
        assert secret not in scrub_text(f"error talking to {url}: refused")


@pytest.mark.parametrize("password", ["pa?ss", "pa#ss", "pa/s?s", "p@s?s", "pa?ss/x#y"])
def test_no_part_of_a_userinfo_is_left_whatever_the_password_holds(password):
    for url in (f"s3://usr1:{password}@bucket/key", f"postgresql://usr1:{password}@db:5432/pcbo?sslmode=x"):
        for shown in (redact_url(url), scrub_text(f"cannot reach {url}: refused")):
            assert "usr1" not in shown and "pa" not in shown and "ss" not in shown, shown


def test_scrub_text_removes_a_userinfo_whose_scheme_a_client_cut_off():
    """botocore's ParamValidationError names the bucket of `s3://user:password@bucket/key` as it
    parsed it: `user:password@bucket`."""
    message = (
        'Invalid bucket name "AKIAEXAMPLE:SuperSecretPw1@bucket": Bucket name must match the regex '
        '"^[a-zA-Z0-9.\\-_]{1,255}$" or be an ARN matching the regex "^arn:(aws).*:(s3|s3-object-lambda):"'
    )
    assert scrub_text(message).startswith('Invalid bucket name "[redacted]@bucket": Bucket name must')
    assert "Secret" not in scrub_text(message) and "AKIA" not in scrub_text(message)
    assert scrub_text("lake usr:Lake/Secret@Pw@bucket/lake down") == "lake [redacted]@bucket/lake down"
    assert scrub_text("(u:p?w@host)") == "([redacted]@host)"
    # not a userinfo: times, a key:value, an address, a URL already redacted
    for text in ("at 10:30 k:v was set; mail a@b.com", "s3://[redacted]@bucket/x", "https://h/p?[redacted]"):
        assert scrub_text(text) == text


CREDENTIAL_URLS = [
    ("s3://AKIAEXAMPLE:SuperSecretPw1@bucket/records.jsonl", "s3://bucket/records.jsonl"),
    ("s3://usr1:Pa?Secret#1@bucket/records.jsonl", "s3://bucket/records.jsonl"),
    ("s3://usr1:Pa/Secret1@bucket/records.jsonl", "s3://bucket/records.jsonl"),
    ("gs://ya29Secret1@bucket/records.jsonl", "gs://bucket/records.jsonl"),
]


@pytest.mark.parametrize("command", ["plan", "dry-run", "execute"])
@pytest.mark.parametrize(("uri", "shown"), CREDENTIAL_URLS)
def test_a_source_uri_with_credentials_is_invalid_input_shown_without_them(tmp_path, command, uri, shown):
    """Object stores take credentials from the environment only: a userinfo in `source.uri` is exit 2
    naming the field, the URI shown redacted, before any store is reached."""
    request = load_generator().make_request(records=1, partitions=2, seed=3, run_id="creds-001")
    request.pop("sourceRecords")
    request["source"] = {"uri": uri, "format": "jsonl"}
    home = tmp_path / "home"
    run = run_pcbo([command, "--input", write_request(tmp_path / "r.json", request)], home=home)
    assert_refused(run, "source.uri", home)
    assert f"source.uri: {shown}: credentials in a URL are refused" in run.stderr
    assert "Secret" not in run.stderr and "usr1" not in run.stderr and "AKIA" not in run.stderr


@pytest.mark.parametrize(
    ("where", "name"),
    [("env", "PCBO_LAKE_URL"), ("flag", "--lake"), ("env", "PCBO_AUDIT_DIR"), ("flag", "--audit-dir")],
)
def test_a_lake_or_audit_store_url_with_credentials_is_invalid_input(tmp_path, where, name):
    url = "s3://usr1:LakeSecretPw@bucket/lake"
    home = tmp_path / "home"
    args = ["execute", "--input", _request(tmp_path)]
    run = run_pcbo(
        args + ([name, url] if where == "flag" else []), home=home, env={name: url} if where == "env" else {}
    )
    assert_refused(run, name, home)
    assert "s3://bucket/lake: credentials in a URL are refused" in run.stderr
    assert "LakeSecretPw" not in run.stderr and "usr1" not in run.stderr


@pytest.mark.parametrize("field", ["source.uri", "lake", "rollout.stagingLake"])
def test_a_datasets_config_url_with_credentials_is_invalid_input(tmp_path, field):
    values = {"source.uri": "x.jsonl", "lake": "null", "rollout.stagingLake": "null"}
    values[field] = "s3://usr1:CfgSecretPw@bucket/x.jsonl"
    config = tmp_path / "datasets.yaml"
    config.write_text(
        "datasets:\n  - name: events\n    partitioning: {kind: time_window, cron: '0 * * * *', "
        "start: '2024-01-01T00:00:00Z', end: '2024-01-02T00:00:00Z'}\n"
        f"    source: {{uri: '{values['source.uri']}'}}\n    lake: {values['lake']}\n"
        f"    rollout: {{stagingLake: {values['rollout.stagingLake']}}}\n"
    )
    run = run_pcbo(["validate-config", config], cwd=tmp_path)
    assert run.status == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"datasets[0].{field}: s3://bucket/x.jsonl: credentials in a URL are refused" in run.stderr
    assert "CfgSecretPw" not in run.stderr and "usr1" not in run.stderr


def test_a_url_with_a_password_and_a_stray_newline_is_refused_without_the_password(tmp_path):
    home = tmp_path / "home"
    url = "postgresql://pcbo:CatalogSecretPw@127.0.0.1:1/pcbo\n"
    run = run_pcbo(["execute", "--input", _request(tmp_path)], home=home, env={"PCBO_CATALOG_URL": url})
    assert_refused(run, "PCBO_CATALOG_URL", home)
    assert "postgresql://[redacted]@127.0.0.1:1/pcbo\\n" in run.stderr
    assert "CatalogSecretPw" not in run.stderr


def test_secrets_in_urls_reach_no_output_event_or_catalog_row(tmp_path):
    """A source URI and an audit endpoint with credentials: neither the execute document, nor the
    audit events, nor the catalog (lineage, runs) holds them."""
    source = tmp_path / "records.jsonl"
    source.write_text(
        json.dumps(
            {
                "id": "a",
                "occurredAt": "2024-01-01T00:10:00Z",
                "consentGranted": True,
                "jurisdiction": "US",
                "retentionExpiresAt": "2030-01-01T00:00:00Z",
            }
        )
        + "\n"
    )
    request = _jsonl_request(tmp_path, source)
    home = tmp_path / "home"
    run = run_pcbo(
        [
            "execute",
            "--input",
            request,
            "--audit-endpoint",
            "http://writer:hunter2-secret@127.0.0.1:9/pas?token=tok-secret-9",
        ],
        home=home,
    )
    assert run.status == 0, run.stderr
    visible = json.dumps(run.document) + run.stderr
    visible += (home / "pas" / "events" / "v1.jsonl").read_text()
    with sqlite3.connect(home / "catalog.db") as db:
        for table in ("lineage", "runs", "partitions", "audit_events", "discrepancy_events"):
            visible += json.dumps(db.execute(f"SELECT * FROM {table}").fetchall(), default=str)
    for secret in ("hunter2-secret", "tok-secret-9"):
        assert secret not in visible


# -- a datasets config whose cron would make too many partitions ---------------------------------------

CRONS = [
    "*/15 * * * *",
    "0 9 * * 1-5",
    "30 2 1 * *",
    "0 0 * * 0",
    "0 12 1,15 * 1",
    "5 4 * * sun",
    "0 0 29 2 *",
    "7 */3 * JAN-MAR *",
    "0 0 * * 7",
]


@pytest.mark.parametrize("cron", CRONS)
def test_cron_ticks_are_counted_as_dagster_counts_them(cron):
    import datetime as dt

    dg_schedules = pytest.importorskip("dagster._utils.schedules")

    from pcbo_dagster.datasets.config import cron_tick_count

    start = dt.datetime(2024, 1, 1, 0, 7, 30, tzinfo=dt.UTC)
    end = dt.datetime(2024, 3, 10, 13, 0, tzinfo=dt.UTC)
    expected = 0
    for tick in dg_schedules.cron_string_iterator(start.timestamp(), cron, "UTC"):
        if tick.timestamp() >= end.timestamp():
            break
        expected += tick.timestamp() >= start.timestamp()
    got = cron_tick_count(cron, int(start.timestamp() * 1e6), int(end.timestamp() * 1e6), 10**9)
    assert got == expected


def test_a_cron_that_would_make_more_partitions_than_the_limit_is_invalid_quickly(tmp_path):
    config = tmp_path / "datasets.yaml"
    config.write_text(
        "datasets:\n  - name: events\n    partitioning: {kind: time_window, cron: '* * * * *', "
        "start: '2020-01-01T00:00:00Z', end: '2024-01-01T00:00:00Z'}\n    source: {uri: x.jsonl}\n"
    )
    run = run_pcbo(["validate-config", config], cwd=tmp_path, timeout=60)
    assert run.status == 2 and "partitioning.cron" in run.stderr and "100000" in run.stderr, run.stderr


def test_a_ledger_batch_that_decompresses_past_the_limit_is_invalid_input(tmp_path):
    pytest.importorskip("stellar_sdk")
    from pcbo_dagster_tests import ledger_archive_builder as builder

    root = tmp_path / "archive"
    builder.write_archive(root, 2, 9, ledgers_per_file=4, files_per_partition=2)
    request = {
        "runId": "bomb-run",
        "dataset": "ledgers",
        "ledgerRange": {"field": "ledgerSequence", "first": 2, "end": 10, "partitionSize": 8},
        "source": {"uri": str(root), "format": "ledger_archive"},
    }
    home = tmp_path / "home"
    run = run_pcbo(
        ["dry-run", "--input", write_request(tmp_path / "r.json", request)],
        home=home,
        env={"PCBO_MAX_BATCH_BYTES": "1024"},
    )
    assert_refused(run, "source", home)
    assert "decompresses past 1024 bytes" in run.stderr


def _run_limited(
    args: list[str | Path], home: Path, env: dict[str, str], data_bytes: int
) -> subprocess.CompletedProcess[str]:
    """`pcbo *args` in a process allowed `data_bytes` of data (RLIMIT_DATA), its own decoding included."""
    import resource

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (data_bytes, data_bytes))

    return subprocess.run(
        [sys.executable, "-m", "pcbo_dagster.cli.main", *map(str, args)],
        env=pcbo_env(home, {"PCBO_LEDGER_WORKERS": "1", **env}),
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=limit_memory,  # noqa: PLW1509 - no threads in this process use the fork
    )


def test_a_zstd_bomb_is_refused_within_bounded_memory_with_the_default_limits(tmp_path):
    """16 KiB of run-length blocks naming themselves ledger 2 decompress to 512 MiB: refused past
    the default PCBO_MAX_BATCH_BYTES (256 MiB) by a process allowed 600 MiB of data. Under the old
    1 GiB default it was read whole and copied (MemoryError here, 1 GiB of memory without a limit),
    and each decoding process may hold one."""
    pytest.importorskip("stellar_sdk")
    from pcbo_dagster.sources.ledger_archives import batch_name
    from pcbo_dagster_tests import ledger_archive_builder as builder

    path = tmp_path / "archive" / batch_name(2, 2)
    path.parent.mkdir()
    path.write_bytes(builder.zstd_bomb(512 << 20))
    assert path.stat().st_size < 20 << 10
    home = tmp_path / "home"
    run = _run_limited(["dry-run", "--input", _ledger_request(tmp_path, path.parent)], home, {}, 600 << 20)
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert f"{path}: decompresses past {256 << 20} bytes (PCBO_MAX_BATCH_BYTES)" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and not home.exists()


def _ledger_request(tmp_path: Path, archive: Path) -> Path:
    request = {
        "runId": "large-ledger-run",
        "dataset": "ledgers",
        "ledgerRange": {"field": "ledgerSequence", "first": 2, "end": 3, "partitionSize": 1},
        "source": {"uri": str(archive), "format": "ledger_archive"},
    }
    return write_request(tmp_path / "r.json", request)


def test_a_ledger_larger_than_the_limit_is_invalid_input(tmp_path):
    """A ledger's XDR is bounded by PCBO_MAX_LEDGER_BYTES, not only its batch file: a valid ledger
    holding a large byte string was read into a record as large."""
    pytest.importorskip("stellar_sdk")
    from pcbo_dagster_tests import ledger_archive_builder as builder

    path = builder.write_large_ledger(tmp_path / "archive", 2, 100_000)
    request = _ledger_request(tmp_path, tmp_path / "archive")
    home = tmp_path / "home"
    run = run_pcbo(["execute", "--input", request], home=home, env={"PCBO_MAX_LEDGER_BYTES": "65536"})
    assert_refused(run, "source", home)
    assert str(path) in run.stderr and "ledger 2 holds 101" in run.stderr, run.stderr
    assert "more than 65536 (PCBO_MAX_LEDGER_BYTES)" in run.stderr, run.stderr
    ok = run_pcbo(["execute", "--input", request], home=home, env={"PCBO_MAX_LEDGER_BYTES": "200000"})
    assert ok.status == 0, ok.stderr


def test_a_few_kib_ledger_file_that_decompresses_to_hundreds_of_mib_is_refused_in_bounded_memory(tmp_path):
    """A 7 KiB batch file holding one valid ledger of 200 MiB (a contract code entry of zeros), with
    the default limits, by a process allowed 700 MiB of data: refused naming the file, where it was
    read into a 270 MiB record, the process holding about 1.3 GiB on the way (or failing with
    MemoryError under this limit)."""
    pytest.importorskip("stellar_sdk")
    from pcbo_dagster_tests import ledger_archive_builder as builder

    path = builder.write_large_ledger(tmp_path / "archive", 2, 200 << 20)
    assert path.stat().st_size < 16 << 10
    home = tmp_path / "home"
    proc = _run_limited(["dry-run", "--input", _ledger_request(tmp_path, path.parent)], home, {}, 700 << 20)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert str(path) in proc.stderr and "(PCBO_MAX_LEDGER_BYTES)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not home.exists()


@pytest.mark.parametrize("kind", ["dev_zero", "large_file", "stdin"])
def test_a_flag_s_file_larger_than_the_limit_is_invalid_input(tmp_path, kind):
    """A file a flag names is read whole: past PCBO_MAX_INPUT_BYTES (a runaway pipe, /dev/zero given by
    mistake) it is refused naming the flag, before memory runs out."""
    home = tmp_path / "home"
    request = _request(tmp_path)
    size = request.stat().st_size
    env = {"PCBO_MAX_INPUT_BYTES": str(size - 1)}
    if kind == "dev_zero":
        run = run_pcbo(["execute", "--input", "/dev/zero"], home=home, env=env, timeout=60)
    elif kind == "large_file":
        run = run_pcbo(["execute", "--input", request], home=home, env=env)
    else:
        run = run_pcbo(["execute", "--input", "-"], home=home, env=env, stdin=request.read_bytes())
    assert_refused(run, "--input", home)
    assert f"more than {size - 1} bytes (PCBO_MAX_INPUT_BYTES)" in run.stderr
    # the same file within the limit runs
    ok = run_pcbo(["dry-run", "--input", request], home=home, env={"PCBO_MAX_INPUT_BYTES": str(size)})
    assert ok.status == 0, ok.stderr


def test_a_proof_file_that_never_ends_is_invalid_input(tmp_path):
    from pcbo_dagster.core.signed_note import signing_key_from_seed

    key = signing_key_from_seed("ops.example.com/operator", bytes(32)).verifier().text
    home = tmp_path / "home"
    run = run_pcbo(
        ["log", "verify-proof", "--proof", "/dev/zero", "--key", key],
        home=home,
        env={"PCBO_MAX_INPUT_BYTES": "4096"},
        timeout=60,
    )
    assert run.status == 2 and "--proof" in run.stderr and "PCBO_MAX_INPUT_BYTES" in run.stderr, run.stderr
