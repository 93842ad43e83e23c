"""`pcbo execute --dagster URL` against a real `dagster-webserver` on loopback.

The webserver serves the pcbo code location over a throw-away DAGSTER_HOME (a `dagster.yaml` with the
DefaultRunCoordinator: a submitted run is launched at once as a subprocess, no daemon needed) and a
throw-away PCBO_HOME. `pcbo execute --dagster` runs as a subprocess; its document must carry the
same hashes, Merkle roots and file checksums as a local `pcbo execute` of the same request.

Every subprocess gets PYTHONPATH = this checkout, so it runs the code under test even when the
installed (editable) package points at another checkout.
"""

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dagster_webserver")
pytest.importorskip("dagster_graphql")

from pcbo_dagster.cli import main as cli  # noqa: E402
from pcbo_dagster.datasets.config import DEFAULT_DATASETS_CONFIG  # noqa: E402
from pcbo_dagster.datasets.demo_data import generate_demo_data  # noqa: E402
from pcbo_dagster_tests.dagster_harness import webserver_process  # noqa: E402
from pcbo_dagster_tests.loopback import free_port  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = DEFAULT_DATASETS_CONFIG  # the example shipped in the package

REQUEST = {
    "runId": "submitted-001",
    "dataset": "ledgers",
    "ledgerRange": {"field": "ledgerSequence", "first": 2, "end": 400, "partitionSize": 64},
    "policies": {"requireConsent": True, "allowedJurisdictions": ["US"], "onViolation": "omit"},
    "source": {"uri": "demo_data/ledgers.jsonl", "format": "jsonl"},
    "metadata": {"initiator": "test_cli_dagster_submit"},
}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCBO_", "DAGSTER_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        PYTHONUNBUFFERED="1",
        DAGSTER_HOME=str(tmp_path / "dagster-home"),
        **extra,
    )
    return env


def _run_ids(url: str) -> list[str]:
    """The ids of the webserver's runs (all of which must have succeeded)."""
    query = "{ runsOrError { __typename ... on Runs { results { runId status } } } }"
    body = json.dumps({"query": query}).encode()
    request = urllib.request.Request(
        f"{url}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.loads(response.read())["data"]["runsOrError"]["results"]
    assert all(r["status"] == "SUCCESS" for r in runs), runs
    return [r["runId"] for r in runs]


def _run_count(url: str) -> int:
    return len(_run_ids(url))


def _comparable(document: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": document["status"],
        "planHash": document["planHash"],
        "decisionHash": document["decisionHash"],
        "partitions": [
            (
                p["key"],
                p["recordCount"],
                p["merkleRoot"],
                [
                    (f["uri"].rsplit("/", 1)[-1], f["checksum"], f["rowCount"], f["byteSize"])
                    for f in p["files"]
                ],
            )
            for p in document["partitions"]
        ],
        "reconciliation": document["reconciliation"]["totals"],
    }


@pytest.mark.slow
def test_execute_dagster_runs_the_request_on_a_webserver(tmp_path, capsys):
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(EXAMPLE, workdir / "datasets.yaml")
    generate_demo_data(workdir / "demo_data")
    (tmp_path / "dagster-home").mkdir()
    # The DefaultRunCoordinator launches at once (the default QueuedRunCoordinator needs the daemon).
    (tmp_path / "dagster-home" / "dagster.yaml").write_text(
        "run_coordinator:\n"
        "  module: dagster._core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n"
        "telemetry:\n"
        "  enabled: false\n"
    )
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        "load_from:\n"
        "  - python_module:\n"
        "      module_name: pcbo_dagster.dagster_defs.definitions\n"
        "      location_name: pcbo\n"
        f"      working_directory: {REPO_ROOT}\n"
    )
    request = workdir / "request.json"
    request.write_text(json.dumps(REQUEST, indent=1))
    server_home = tmp_path / "server-pcbo-home"

    # The same request executed locally into another home: the reference document.
    assert cli.main(["execute", "--input", str(request), "--home", str(tmp_path / "local-home")]) == 0
    local = json.loads(capsys.readouterr().out)

    log = tmp_path / "webserver.log"
    server_env = _env(
        tmp_path, PCBO_HOME=str(server_home), PCBO_DATASETS_CONFIG=str(workdir / "datasets.yaml")
    )
    with webserver_process(workspace, server_env, tmp_path, log) as (url, _):

        def pcbo(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "pcbo_dagster.cli.main", *args],
                env=_env(tmp_path),
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
            )

        done = pcbo("execute", "--dagster", url, "--input", str(request), "--dagster-timeout", "120")
        assert done.returncode == 0, done.stderr[-3000:] + log.read_text()[-3000:]
        remote = json.loads(done.stdout)
        assert _comparable(remote) == _comparable(local)
        # The document names the Dagster run that did the work.
        assert _run_ids(url) == [remote["dagsterRun"]["runId"]]
        assert remote["dagsterRun"]["url"] == f"{url}/runs/{remote['dagsterRun']['runId']}"
        assert remote["runId"] == "submitted-001" and remote["status"] == "committed"
        assert [p["key"] for p in remote["partitions"]] == [
            "range=2-65",
            "range=66-129",
            "range=130-193",
            "range=194-257",
            "range=258-321",
            "range=322-385",
            "range=386-399",
        ]
        # Written by the run, into the code location's PCBO_HOME, not the caller's.
        assert all(str(server_home / "lake") in p["manifest"] for p in remote["partitions"])
        assert not (tmp_path / ".pcbo").exists()

        # Submitted again: the run finds identical content committed and says so.
        again = pcbo(
            "execute", "--dagster", url, "--input", str(request), "--output", str(tmp_path / "again.json")
        )
        assert again.returncode == 0, again.stderr[-3000:]
        document = json.loads((tmp_path / "again.json").read_text())
        assert document["status"] == "unchanged"
        assert document["dagsterRun"]["runId"] in _run_ids(url)
        assert document["dagsterRun"]["runId"] != remote["dagsterRun"]["runId"]
        assert _comparable(document)["planHash"] == local["planHash"]

        # Invalid input is refused here, exit 2 naming the field, and nothing is submitted.
        assert _run_count(url) == 2
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(dict(REQUEST, ledgerRange=dict(REQUEST["ledgerRange"], end=2))))
        refused = pcbo("execute", "--dagster", url, "--input", str(bad))
        assert refused.returncode == 2 and refused.stdout == ""
        assert "ledgerRange.end" in refused.stderr and "Traceback" not in refused.stderr
        assert _run_count(url) == 2


def test_a_dagster_url_nothing_answers_at_is_one_line_naming_it(tmp_path):
    """A webserver that is not there (a closed port on loopback): exit 1 and one line on stderr naming
    the URL and the failure, as a server that went away is everywhere. dagster-graphql's error carried
    the whole GraphQL query it had sent (about 25 lines) and not the failure itself."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    request = workdir / "request.json"
    request.write_text(
        json.dumps({k: v for k, v in REQUEST.items() if k != "source"} | {"sourceRecords": []})
    )
    url = f"http://127.0.0.1:{free_port()}"
    run = subprocess.run(
        [sys.executable, "-m", "pcbo_dagster.cli.main", "execute", "--dagster", url, "--input", str(request)],
        env=_env(tmp_path, PCBO_HOME=str(tmp_path / "home")),
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"pcbo execute: cannot submit pcbo_request to Dagster at {url}: ")
    assert "Connection refused" in lines[0]  # the failure itself
    assert "repositoriesOrError" not in run.stderr and "Traceback" not in run.stderr  # not the query
