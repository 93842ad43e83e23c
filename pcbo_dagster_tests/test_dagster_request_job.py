"""The `pcbo_request` job (a request JSON through the engine, from the launchpad) and the CLI commands
of the code location: `pcbo validate-config`, `pcbo demo-data`, and `execute --dagster`'s local part."""

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import dagster as dg
else:
    dg = pytest.importorskip("dagster")

from pcbo_dagster.cli import main as cli  # noqa: E402
from pcbo_dagster.dagster_defs.backfill.jobs import (  # noqa: E402
    DOCUMENT_ENTRY,
    JOB_NAME,
    OP_NAME,
    pcbo_request_job,
)
from pcbo_dagster.dagster_defs.definitions import build_definitions  # noqa: E402
from pcbo_dagster.dagster_defs.remote import (  # noqa: E402
    RemoteRunFailed,
    Webserver,
    outcome_of,
)
from pcbo_dagster.dagster_defs.resources import PcboEngineResource  # noqa: E402
from pcbo_dagster.datasets.config import DEFAULT_DATASETS_CONFIG  # noqa: E402
from pcbo_dagster_tests.cli_runner import run_pcbo  # noqa: E402
from pcbo_dagster_tests.example_location import example_workdir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = DEFAULT_DATASETS_CONFIG  # the example shipped in the package

EVENTS_REQUEST = {
    "runId": "job-run-001",
    "dataset": "events",
    "versionLabel": "v1",
    "start": "2024-01-01T00:00:00Z",
    "end": "2024-01-01T06:00:00Z",
    "chunkSeconds": 3600,
    "policies": {
        "requireConsent": True,
        "allowedJurisdictions": ["US", "CA"],
        "retentionCutoff": "2024-06-01T00:00:00Z",
        "onViolation": "omit",
    },
    "source": {"uri": "demo_data/events.jsonl", "format": "jsonl"},
    "existingTargetIds": ["evt-000007"],
    "metadata": {"initiator": "tests"},
}
LEDGER_REQUEST = {
    "runId": "job-run-002",
    "dataset": "ledgers",
    "ledgerRange": {"field": "ledgerSequence", "first": 2, "end": 300, "partitionSize": 64},
    "policies": {"requireConsent": True, "allowedJurisdictions": ["US"]},
    "source": {"uri": "demo_data/ledgers.jsonl"},
}


@pytest.fixture(autouse=True)
def _no_pcbo_variables(monkeypatch):
    for var in ("PCBO_HOME", "PCBO_LAKE_URL", "PCBO_CATALOG_URL", "PCBO_AUDIT_DIR", "PCBO_AUDIT_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("PCBO_SOURCES_DIR", raising=False)
    monkeypatch.delenv("PCBO_DATASETS_CONFIG", raising=False)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return example_workdir(tmp_path)


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, Any, str]:
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, (json.loads(out) if out.strip() else None), err


def _run_config(request: dict[str, Any] | str, base_dir: Path | None = None) -> dict[str, Any]:
    text = request if isinstance(request, str) else json.dumps(request, indent=1)
    config: dict[str, Any] = {"request_json": text}
    if base_dir is not None:
        config["base_dir"] = str(base_dir)
    return {"ops": {OP_NAME: {"config": config}}}


def _step_failure(result: dg.ExecuteInProcessResult) -> Any:
    event = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return event.step_failure_data.user_failure_data


def _comparable(document: dict[str, Any]) -> dict[str, Any]:
    """What must not depend on where or how a request ran: hashes, roots, file checksums and sizes."""
    return {
        "status": document["status"],
        "planHash": document["planHash"],
        "decisionHash": document["decisionHash"],
        "partitions": [
            {
                "key": p["key"],
                "start": p["start"],
                "end": p["end"],
                "recordCount": p["recordCount"],
                "merkleRoot": p["merkleRoot"],
                "files": [
                    (f["uri"].rsplit("/", 1)[-1], f["checksum"], f["rowCount"], f["byteSize"])
                    for f in p["files"]
                ],
            }
            for p in document["partitions"]
        ],
        "reconciliation": document["reconciliation"]["totals"],
        "totals": document["totals"],
    }


@pytest.mark.parametrize(
    "request_body", [EVENTS_REQUEST, LEDGER_REQUEST], ids=["time-window", "ledger-range"]
)
def test_the_request_job_gives_the_cli_execute_document(workdir, tmp_path, capsys, request_body):
    engine = PcboEngineResource(home=str(tmp_path / "dagster-home"))
    defs = build_definitions(workdir / "datasets.yaml", resource=engine)
    job = defs.resolve_job_def(JOB_NAME)
    with dg.instance_for_test() as instance:
        # No base_dir: a relative source resolves against the datasets config's directory.
        result = job.execute_in_process(instance=instance, run_config=_run_config(request_body))
        assert result.success
        document = result.output_for_node(OP_NAME)
        [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
        metadata = output.event_specific_data.metadata
        assert metadata[DOCUMENT_ENTRY].value == document
        assert metadata["plan_hash"].value == document["planHash"]
        assert metadata["status"].value == "committed"
        messages = [e.message for e in instance.all_logs(result.run_id)]
        for step in (
            "policy gate:",
            "gates passed",
            "parquet emission:",
            "audit chain append:",
            "reconciliation:",
        ):
            assert any(step in m for m in messages), step

    request_file = workdir / "request.json"
    request_file.write_text(json.dumps(request_body))
    status, local, err = _run_cli(
        ["execute", "--input", str(request_file), "--home", str(tmp_path / "cli-home")], capsys
    )
    assert status == 0, err
    assert _comparable(document) == _comparable(local)
    assert document["runId"] == local["runId"] == request_body["runId"]
    assert all(str(tmp_path / "dagster-home") in p["manifest"] for p in document["partitions"])

    # The engine's own verification agrees with the job's writes.
    status, report, err = _run_cli(["verify", "--home", str(tmp_path / "dagster-home")], capsys)
    assert status == 0 and report["status"] == "clean", report


def test_invalid_requests_and_gates_fail_the_job_naming_the_field_and_write_nothing(workdir, tmp_path):
    home = tmp_path / "home"
    resources = {"pcbo": PcboEngineResource(home=str(home))}
    typo = dict(EVENTS_REQUEST, policies={"requireConsnet": False})
    cases = [
        (typo, "policies.requireConsnet", "unknown field"),
        ('{"runId": "r", "runId": "s"}', "request", "duplicate key"),
        (dict(EVENTS_REQUEST, source={"uri": "nowhere.jsonl"}), "source.uri", "no such file"),
        (dict(EVENTS_REQUEST, chunkSeconds=0), "chunkSeconds", "greater than or equal to 1"),
    ]
    with dg.instance_for_test() as instance:
        for request, field, words in cases:
            result = pcbo_request_job.execute_in_process(
                instance=instance,
                run_config=_run_config(request, base_dir=workdir),
                resources=resources,
                raise_on_error=False,
            )
            assert not result.success
            failure = _step_failure(result)
            assert failure.description.startswith(f"invalid input: {field}: "), failure.description
            assert words in failure.description
            assert failure.metadata["field"].value == field
            assert failure.metadata["pcbo_outcome"].value == "invalid_input"

        blocked = dict(EVENTS_REQUEST, policies=dict(EVENTS_REQUEST["policies"], onViolation="block"))
        result = pcbo_request_job.execute_in_process(
            instance=instance,
            run_config=_run_config(blocked, base_dir=workdir),
            resources=resources,
            raise_on_error=False,
        )
        failure = _step_failure(result)
        assert "blocked by the onViolation gate" in failure.description
        document = failure.metadata["document"].value
        assert document["status"] == "blocked" and document["gate"] == "onViolation"
        assert len(document["breaches"]) > 0
    assert not (home / "lake").exists()


def test_remote_outcomes_map_to_the_cli_contract():
    ok = {"__typename": "ExecutionStepOutputEvent", "stepKey": OP_NAME}
    ok["metadataEntries"] = [{"label": DOCUMENT_ENTRY, "jsonString": '{"status": "committed"}'}]
    # Every document names the Dagster run it came from.
    assert outcome_of("r", "SUCCESS", [ok], "u") == {
        "status": "committed",
        "dagsterRun": {"runId": "r", "url": "u"},
    }

    def failed(entries: list[dict[str, str]], description: str = "boom") -> dict[str, Any]:
        return {
            "__typename": "ExecutionStepFailureEvent",
            "stepKey": OP_NAME,
            "error": {"message": "trace"},
            "failureMetadata": {"description": description, "metadataEntries": entries},
        }

    invalid = failed(
        [
            {"label": "pcbo_outcome", "text": "invalid_input"},
            {"label": "field", "text": "policies.x"},
            {"label": "message", "text": "unknown field"},
        ]
    )
    with pytest.raises(cli.InvalidInput) as info:
        outcome_of("r", "FAILURE", [invalid], "u")
    assert (info.value.field, info.value.message) == ("policies.x", "unknown field (Dagster run r)")
    gate = failed(
        [{"label": "pcbo_outcome", "text": "blocked"}, {"label": "document", "jsonString": '{"gate": "g"}'}]
    )
    with pytest.raises(cli.Blocked) as blocked:
        outcome_of("r", "FAILURE", [gate], "u")
    assert blocked.value.document == {"gate": "g", "dagsterRun": {"runId": "r", "url": "u"}}
    with pytest.raises(RemoteRunFailed, match="boom"):
        outcome_of("r", "FAILURE", [failed([])], "u")
    with pytest.raises(RemoteRunFailed, match="ended CANCELED: stopped"):
        outcome_of("r", "CANCELED", [{"__typename": "RunFailureEvent", "message": "stopped"}], "u")
    server = Webserver.parse("https://dagster.example.com:8443/prefix/")
    assert (server.host, server.port, server.https, server.path_prefix) == (
        "dagster.example.com",
        8443,
        True,
        "/prefix",
    )
    assert Webserver.parse("127.0.0.1:3000").base_url == "http://127.0.0.1:3000"
    with pytest.raises(cli.InvalidInput, match="--dagster"):
        Webserver.parse("ftp://x")


def test_execute_dagster_validates_and_gates_locally_before_submitting(workdir, tmp_path, capsys):
    # Port 9 (discard) on loopback: nothing listens; a submission would fail with exit 1, not 2 or 3.
    url = "http://127.0.0.1:9"
    bad = workdir / "bad.json"
    bad.write_text(json.dumps(dict(EVENTS_REQUEST, policies={"requireConsnet": False})))
    status, document, err = _run_cli(["execute", "--dagster", url, "--input", str(bad)], capsys)
    assert (status, document) == (2, None)
    assert "policies.requireConsnet" in err

    blocked = workdir / "blocked.json"
    blocked.write_text(
        json.dumps(dict(EVENTS_REQUEST, policies=dict(EVENTS_REQUEST["policies"], onViolation="block")))
    )
    status, document, err = _run_cli(["execute", "--dagster", url, "--input", str(blocked)], capsys)
    assert status == 3 and document["gate"] == "onViolation"

    good = workdir / "good.json"
    good.write_text(json.dumps(EVENTS_REQUEST))
    status, _, err = _run_cli(["execute", "--dagster", url, "--input", str(good), "--home", "h"], capsys)
    assert status == 2 and "--home" in err
    status, _, err = _run_cli(
        ["execute", "--dagster", url, "--input", str(good), "--dagster-timeout", "5"], capsys
    )
    assert status == 1 and "cannot" in err and "127.0.0.1:9" in err


# --- pcbo validate-config / demo-data -----------------------------------------------------------


def test_validate_config_lists_datasets_and_partition_counts(workdir, tmp_path, capsys, monkeypatch):
    status, document, err = _run_cli(["validate-config", str(workdir / "datasets.yaml")], capsys)
    assert status == 0, err
    assert document["status"] == "valid" and document["config"] == str(workdir / "datasets.yaml")
    summary = {d["name"]: d for d in document["datasets"]}
    assert summary["events"]["partitionCount"] == 72
    assert (summary["events"]["firstPartition"], summary["events"]["lastPartition"]) == (
        "20240101T000000Z",
        "20240103T230000Z",
    )
    assert summary["ledgers"]["partitionCount"] == 10
    assert summary["ledgers"]["lastPartition"] == "range=578-641"
    assert summary["events"]["source"]["present"] is True
    assert document["totals"] == {"datasets": 3, "partitions": 106}

    # The default file: PCBO_DATASETS_CONFIG, else the example. An irregular cron and open ends.
    text = (workdir / "datasets.yaml").read_text()
    other = tmp_path / "other.yaml"
    other.write_text(
        re.sub(r"\n *lastLedger: 641[^\n]*", "", text.replace("cron: hourly", 'cron: "0 0,6 * * *"', 1))
    )
    monkeypatch.setenv("PCBO_DATASETS_CONFIG", str(other))
    status, document, err = _run_cli(["validate-config"], capsys)
    assert status == 0, err
    summary = {d["name"]: d for d in document["datasets"]}
    assert summary["events"]["partitionCount"] == 6  # two windows a day, three days
    assert summary["ledgers"]["partitionCount"] is None and summary["ledgers"]["openEnded"] is True
    assert document["totals"]["partitions"] is None
    monkeypatch.delenv("PCBO_DATASETS_CONFIG")
    status, document, _ = _run_cli(["validate-config"], capsys)
    assert status == 0 and document["config"] == str(EXAMPLE)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("cron: hourly", 'cron: "0 25 * * *"'), "datasets[0].partitioning.cron"),
        (("requireConsent: true", "requireConsnet: true"), "datasets[0].policies.requireConsnet"),
        (("firstLedger: 2", "firstLedger: 700"), "datasets[1].partitioning.lastLedger"),
    ],
)
def test_validate_config_refuses_a_bad_file_naming_the_field(workdir, capsys, change, field):
    bad = workdir / "bad.yaml"
    bad.write_text((workdir / "datasets.yaml").read_text().replace(*change, 1))
    status, document, err = _run_cli(["validate-config", str(bad)], capsys)
    assert (status, document) == (2, None)
    assert f"invalid input: {field}: " in err and str(bad) in err
    assert "Traceback" not in err
    status, _, err = _run_cli(["validate-config", str(workdir / "missing.yaml")], capsys)
    assert status == 2 and "no such file" in err


def test_demo_data_is_deterministic(tmp_path, capsys):
    first = _run_cli(["demo-data", "--dir", str(tmp_path / "a")], capsys)
    second = _run_cli(
        ["demo-data", "--dir", str(tmp_path / "b"), "--output", str(tmp_path / "b.json")], capsys
    )
    assert first[0] == 0 and second[0] == 0
    second_document = json.loads((tmp_path / "b.json").read_text())
    assert [f["name"] for f in first[1]["files"]] == ["events.jsonl", "ledgers.jsonl", "sessions.jsonl"]
    assert [(f["name"], f["checksum"], f["byteSize"], f["records"]) for f in first[1]["files"]] == [
        (f["name"], f["checksum"], f["byteSize"], f["records"]) for f in second_document["files"]
    ]
    for entry in first[1]["files"]:
        path = Path(entry["path"])
        assert (
            path.parent == tmp_path / "a" and path.read_bytes() == (tmp_path / "b" / path.name).read_bytes()
        )
    assert first[1]["files"][1]["records"] == 640


def test_demo_data_lands_where_the_packaged_example_config_reads_it(tmp_path):
    """Without --dir: $PCBO_HOME/demo_data (PCBO_SOURCES_DIR moves it), where the packaged config looks."""
    home = tmp_path / "home"
    before = run_pcbo(["validate-config"], home=home, cwd=tmp_path)
    assert before.status == 0, before.stderr
    assert before.document["config"] == str(EXAMPLE) and before.document["sourcesDir"] == str(home)
    assert [d["source"]["present"] for d in before.document["datasets"]] == [False, False, False]

    written = run_pcbo(["demo-data"], home=home, cwd=tmp_path)
    assert written.status == 0, written.stderr
    assert written.document["directory"] == str(home / "demo_data")
    after = run_pcbo(["validate-config"], home=home, cwd=tmp_path)
    sources = {d["source"]["uri"] for d in after.document["datasets"]}
    assert sources == {f["path"] for f in written.document["files"]}
    assert all(d["source"]["present"] for d in after.document["datasets"])
    assert not (EXAMPLE.parent / "demo_data").exists()

    elsewhere = tmp_path / "sources"
    moved = run_pcbo(["demo-data"], home=home, cwd=tmp_path, env={"PCBO_SOURCES_DIR": str(elsewhere)})
    assert moved.document["directory"] == str(elsewhere / "demo_data")
    checked = run_pcbo(["validate-config"], home=home, cwd=tmp_path, env={"PCBO_SOURCES_DIR": str(elsewhere)})
    assert checked.document["sourcesDir"] == str(elsewhere)
    assert all(d["source"]["present"] for d in checked.document["datasets"])

    # Unwritable: exit 2 naming --dir, no traceback.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    refused = run_pcbo(["demo-data", "--dir", str(blocker / "demo")], home=home, cwd=tmp_path)
    assert refused.status == 2 and "invalid input: --dir: " in refused.stderr
    assert "Traceback" not in refused.stderr and refused.document is None


def test_the_webserver_s_graphql_answer_is_bounded_and_its_redirect_never_followed(monkeypatch):
    """Red-team finding: the run's events were read with `urlopen`, which followed a webserver's 302
    (a POST turned into a GET of any URL it named: another host, a cloud metadata address, whose
    answer was taken for the run's), read an answer of any size whole, and let an answer dripped a
    byte a second hold the CLI (or the HTTP API's request) past the timeout. A redirect is now an
    error naming it, never followed; the answer is read within the timeout whole, up to its bound."""
    import http.server

    from pcbo_dagster.dagster_defs import remote
    from pcbo_dagster_tests.loopback import DripReceiver, serving

    asked: list[str] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            asked.append(self.path)
            body = json.dumps({"data": {"logsForRun": "forged"}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)) as elsewhere:
        monkeypatch.setattr(remote, "MAX_ANSWER_BYTES", 1000)
        moved = f"HTTP/1.1 302 Found\r\nLocation: {elsewhere}/meta\r\nContent-Length: 0\r\n\r\n"
        redirect = DripReceiver(moved.encode(), b" ")
        big = DripReceiver(b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b" " * 2000, b" ")
        slow = DripReceiver(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n", b" ", gap=0.1)
        try:
            for hostile, said in ((redirect, "302"), (big, "more than"), (slow, "within 1 s")):
                server = remote.Webserver.parse(hostile.url.removesuffix("/hooks"))
                with pytest.raises(remote.RemoteRunFailed, match=said):
                    server.graphql("query { x }", {}, timeout=1.0)
        finally:
            for hostile in (redirect, big, slow):
                hostile.close()
    assert asked == []
