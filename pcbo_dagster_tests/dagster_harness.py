"""A real Dagster deployment for the slow tests: `dagster-webserver` and `dagster-daemon` as
subprocesses on loopback, over a throw-away DAGSTER_HOME and PCBO_HOME, driven through GraphQL.

`deployment(tmp_path)` writes the datasets config beside generated demo data, a workspace file that
loads `pcbo_dagster.dagster_defs.definitions`, and a `dagster.yaml` made from the repository's (its
run retries and concurrency pools kept; the default QueuedRunCoordinator dequeues the runs). The
daemon's backfill loop ticks every 30 s (fixed in Dagster 1.13): a backfill takes ~30-60 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pcbo_dagster.datasets.config import DEFAULT_DATASETS_CONFIG
from pcbo_dagster.datasets.demo_data import generate_demo_data
from pcbo_dagster_tests.approver_keys import list_approvers_in_example
from pcbo_dagster_tests.loopback import free_port, stop_process_group

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = DEFAULT_DATASETS_CONFIG  # the example shipped in the package
REPO_INSTANCE = REPO_ROOT / "dagster.yaml"
BIN = Path(sys.executable).parent
EVENTS = ["events"]
#: Terminal backfill states (BulkActionStatus).
BACKFILL_DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


def executable(name: str) -> str:
    beside = BIN / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed"
    return found


def hourly_keys(first_hour: int, count: int, day: int = 1) -> list[str]:
    return [f"202401{day:02d}T{h:02d}0000Z" for h in range(first_hour, first_hour + count)]


def write_workdir(root: Path) -> Path:
    """The example datasets config with freshly generated demo sources beside it (paths resolve)."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "datasets.yaml"
    shutil.copy(EXAMPLE_CONFIG, config)
    list_approvers_in_example(config)  # approvals are signed by a listed approver (BO, CY)
    generate_demo_data(root / "demo_data")
    return config


def write_instance(home: Path, storage: dict[str, Any] | None = None) -> Path:
    """`$DAGSTER_HOME/dagster.yaml`: the repository's settings (SQLite unless `storage` is given)."""
    home.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_load(REPO_INSTANCE.read_text())
    if storage is not None:
        settings["storage"] = storage
    path = home / "dagster.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def write_workspace(path: Path) -> Path:
    workspace = {
        "load_from": [
            {
                "python_module": {
                    "module_name": "pcbo_dagster.dagster_defs.definitions",
                    "location_name": "pcbo",
                }
            }
        ]
    }
    path.write_text(yaml.safe_dump(workspace, sort_keys=False))
    return path


@contextmanager
def webserver_process(
    workspace: Path, env: dict[str, str], cwd: Path, log: Path, timeout: float = 120
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m dagster_webserver` over `workspace` on a free loopback port, in its own process group
    (its output in `log`): its URL once it answers `/server_info`, then SIGTERM to the group (SIGKILL
    after 30 s). For a test that lays out its own homes and workspace (`deployment` does it all)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable,
        "-m",
        "dagster_webserver",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        str(workspace),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"dagster-webserver exited with {process.returncode}:\n{log.read_text()[-4000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"dagster-webserver did not answer within {timeout:g} s:\n{log.read_text()[-4000:]}"
                )
            time.sleep(0.5)
        yield url, process
    finally:
        stop_process_group(process, 30)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    def tail(self, chars: int = 6000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"----- {self.name} ({self.log}) -----\n{text[-chars:]}"

    def stop(self) -> None:
        """SIGTERM to the process group (the daemon's code server and run workers too), then SIGKILL."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # leftovers of the group (gRPC server, workers)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Deployment:
    root: Path
    config: Path
    workspace: Path
    dagster_home: Path
    pcbo_home: Path
    env: dict[str, str]
    port: int = 0
    processes: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- processes ------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> Process:
        log = self.root / f"{name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            argv,
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start_webserver(self, timeout: float = 120) -> None:
        self.port = free_port()
        web = self._spawn(
            "webserver",
            [
                executable("dagster-webserver"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-w",
                str(self.workspace),
            ],
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if web.popen.poll() is not None:
                raise AssertionError(f"dagster-webserver exited ({web.popen.returncode})\n{web.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5) as response:
                    if response.status == 200:
                        info = json.loads(response.read())
                        assert "dagster_webserver_version" in info, info
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(
                f"dagster-webserver did not answer /server_info in {timeout} s\n{web.tail()}"
            )
        # The code location is loaded (not an error) before anything is launched.
        entries = self.graphql(
            """{ workspaceOrError { __typename ... on Workspace { locationEntries {
                 name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
        )["workspaceOrError"]["locationEntries"]
        assert [(e["name"], e["loadStatus"]) for e in entries] == [("pcbo", "LOADED")], entries
        assert entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation", entries

    def start_code_server(self, workspace: dict[str, Any] | None = None, timeout: float = 120) -> int:
        """`dagster code-server start` on a loopback port (as the compose file's `codeserver` service);
        the workspace then loads the location from it (`grpc_server`), as the compose file's does.
        `workspace` is a workspace document whose grpc_server host/port are set here."""
        from dagster._grpc.client import DagsterGrpcClient

        port = free_port()
        server = self._spawn(
            "codeserver",
            [
                executable("dagster"),
                "code-server",
                "start",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-m",
                "pcbo_dagster.dagster_defs.definitions",
                "--location-name",
                "pcbo",
            ],
        )
        client = DagsterGrpcClient(port=port, host="127.0.0.1")
        deadline = time.monotonic() + timeout

        def serving() -> bool:
            try:  # (the client prints every refused connection: ask it only once the port is open)
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return client.health_check_query() == "SERVING"

        while not serving():
            if server.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the code server is not serving on {port}\n{server.tail()}")
            time.sleep(0.5)
        workspace = workspace or {
            "load_from": [{"grpc_server": {"host": "127.0.0.1", "port": port, "location_name": "pcbo"}}]
        }
        for entry in workspace["load_from"]:
            entry["grpc_server"].update(host="127.0.0.1", port=port)
        self.workspace.write_text(yaml.safe_dump(workspace, sort_keys=False))
        return port

    def start_daemon(self) -> None:
        self._spawn("daemon", [executable("dagster-daemon"), "run", "-w", str(self.workspace)])

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.processes)

    def assert_alive(self) -> None:
        for process in self.processes:
            if process.popen.poll() is not None:
                raise AssertionError(f"{process.name} exited ({process.popen.returncode})\n{self.logs()}")

    # --- GraphQL (what the UI sends) --------------------------------------------------------------

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                document = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[-4000:]
            raise AssertionError(f"POST /graphql: HTTP {exc.code}: {detail}\nquery: {query}") from None
        assert not document.get("errors"), document["errors"]
        return document["data"]

    def launch_backfill(self, asset: list[str], start: str, end: str, title: str | None = None) -> str:
        """A partition-range backfill of one asset, as the asset page's "Materialize" dialog sends it."""
        data = self.graphql(
            """mutation Launch($params: LaunchBackfillParams!) {
                 launchPartitionBackfill(backfillParams: $params) {
                   __typename
                   ... on LaunchBackfillSuccess { backfillId }
                   ... on PythonError { message stack }
                   ... on PartitionKeysNotFoundError { message }
                   ... on UnauthorizedError { message }
                   ... on InvalidSubsetError { message }
                 } }""",
            {
                "params": {
                    "partitionsByAssets": [
                        {"assetKey": {"path": asset}, "partitions": {"range": {"start": start, "end": end}}}
                    ],
                    "title": title,
                }
            },
        )["launchPartitionBackfill"]
        assert data["__typename"] == "LaunchBackfillSuccess", data
        return data["backfillId"]

    def backfill(self, backfill_id: str) -> dict[str, Any]:
        return self.graphql(
            """query Backfill($id: String!) {
                 partitionBackfillOrError(backfillId: $id) {
                   __typename
                   ... on PartitionBackfill {
                     id status isAssetBackfill numPartitions
                     runs { runId status tags { key value } }
                     error { message }
                   }
                   ... on PythonError { message }
                 } }""",
            {"id": backfill_id},
        )["partitionBackfillOrError"]

    def wait_for_backfills(self, backfill_ids: list[str], timeout: float = 240) -> dict[str, dict[str, Any]]:
        """Poll until every backfill is in a final state and its runs are finished."""
        deadline = time.monotonic() + timeout
        states: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            self.assert_alive()
            states = {b: self.backfill(b) for b in backfill_ids}
            if all(
                s["status"] in BACKFILL_DONE
                and all(r["status"] in {"SUCCESS", "FAILURE", "CANCELED"} for r in s["runs"])
                for s in states.values()
            ):
                return states
            time.sleep(2)
        raise AssertionError(f"backfills not finished in {timeout} s: {states}\n{self.logs()}")

    def materializations(self, asset: list[str], partitions: list[str]) -> list[dict[str, Any]]:
        return self.graphql(
            """query Mats($key: AssetKeyInput!, $partitions: [String!]) {
                 assetOrError(assetKey: $key) {
                   __typename
                   ... on Asset {
                     assetMaterializations(partitions: $partitions) {
                       partition runId stepKey timestamp
                       metadataEntries {
                         __typename label
                         ... on IntMetadataEntry { intValue }
                         ... on TextMetadataEntry { text }
                         ... on UrlMetadataEntry { url }
                         ... on JsonMetadataEntry { jsonString }
                       }
                     }
                   }
                 } }""",
            {"key": {"path": asset}, "partitions": partitions},
        )["assetOrError"]["assetMaterializations"]

    def check_executions(self, asset: list[str], check: str, limit: int = 200) -> list[dict[str, Any]]:
        return self.graphql(
            """query Checks($key: AssetKeyInput!, $check: String!, $limit: Int!) {
                 assetCheckExecutions(assetKey: $key, checkName: $check, limit: $limit) {
                   runId status partition
                   evaluation { success partition severity
                     metadataEntries { __typename label ... on IntMetadataEntry { intValue } } }
                 } }""",
            {"key": {"path": asset}, "check": check, "limit": limit},
        )["assetCheckExecutions"]

    def run_events(self, run_id: str) -> list[dict[str, Any]]:
        """Every event of a run (type, step, timestamp in ms), paged like the run page."""
        events: list[dict[str, Any]] = []
        cursor = None
        while True:
            data = self.graphql(
                """query Logs($runId: ID!, $cursor: String) {
                     logsForRun(runId: $runId, afterCursor: $cursor, limit: 1000) {
                       __typename
                       ... on EventConnection {
                         cursor hasMore
                         events { __typename ... on MessageEvent { eventType stepKey timestamp message } }
                       }
                       ... on PythonError { message }
                     } }""",
                {"runId": run_id, "cursor": cursor},
            )["logsForRun"]
            assert data["__typename"] == "EventConnection", data
            events.extend(data["events"])
            cursor = data["cursor"]
            if not data["hasMore"]:
                return events


def metadata_of(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """GraphQL metadata entries as {label: value}."""
    out: dict[str, Any] = {}
    for entry in entries:
        for name in ("intValue", "text", "url", "jsonString"):
            if name in entry:
                out[entry["label"]] = entry[name]
                break
        else:
            out[entry["label"]] = None
    return out


def pcbo_env(pcbo_home: Path, config: Path, dagster_home: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PCBO_", "DAGSTER_"))}
    env.update(
        {
            "PCBO_HOME": str(pcbo_home),
            "PCBO_DATASETS_CONFIG": str(config),
            "DAGSTER_HOME": str(dagster_home),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def pcbo_verify(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """`pcbo verify` as an operator runs it (same PCBO_* variables as the code location)."""
    done = subprocess.run(
        [executable("pcbo"), "verify"], env=env, cwd=cwd, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"pcbo verify exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr}"
    return json.loads(done.stdout)


@contextmanager
def deployment(
    root: Path, extra_env: dict[str, str] | None = None, instance: dict[str, Any] | None = None
) -> Iterator[Deployment]:
    """Webserver and daemon (and a code server) over a fresh home: the processes' groups are killed on
    exit, their logs printed on failure. `instance` replaces the repository's dagster.yaml settings."""
    config = write_workdir(root / "work")
    dagster_home = root / "dagster_home"
    if instance is None:
        write_instance(dagster_home)
    else:
        dagster_home.mkdir(parents=True)
        (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(instance, sort_keys=False))
    workspace = write_workspace(root / "workspace.yaml")
    pcbo_home = root / "pcbo"
    env = pcbo_env(pcbo_home, config, dagster_home, **(extra_env or {}))
    dep = Deployment(root, config, workspace, dagster_home, pcbo_home, env)
    try:
        yield dep
    except BaseException:
        print(dep.logs())
        raise
    finally:
        dep.stop()


# --- the audit chain, read straight from the local backup (no engine code) ---------------------------


def chain_events(pcbo_home: Path, dataset: str = "events", version_label: str = "v1") -> list[dict[str, Any]]:
    path = pcbo_home / "pas" / dataset / f"{version_label}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_chain_never_forks(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """One linear chain (seq 0..n-1, each event linked to the one before), and per partition exactly one
    `partition_committed` event per content version (manifest checksum), versions numbered 1, 2, ...
    Returns the commit events by partition key."""
    previous = None
    for seq, event in enumerate(events):
        chain = event["chain"]
        assert chain["seq"] == seq, f"event {seq} has seq {chain['seq']}"
        assert chain["prev_event_hash"] == previous, f"event {seq} does not link to event {seq - 1}"
        previous = chain["event_hash"]
    hashes = [e["chain"]["event_hash"] for e in events]
    assert len(set(hashes)) == len(hashes), "an event hash appears twice"
    commits: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event["event_type"] == "partition_committed":
            commits.setdefault(event["partition"]["key"], []).append(event)
    for key, found in commits.items():
        checksums = [e["manifest"]["checksum"] for e in found]
        assert len(set(checksums)) == len(checksums), f"{key}: one content version committed twice"
        versions = [e["partition"]["version"] for e in found]
        assert versions == list(range(1, len(found) + 1)), f"{key}: versions {versions}"
    return commits


def materialize_range(config: Path, asset: str, start: str, end: str, instance: Any) -> Any:
    """One in-process range run of `asset` and its checks, from the code location's own `Definitions`
    (resources bound to the PCBO_* variables of this process), as a range backfill run tags it."""
    import dagster as dg

    from pcbo_dagster.dagster_defs.definitions import build_definitions

    defs = build_definitions(config)
    assert defs.assets is not None
    assets: list[dg.AssetsDefinition | dg.AssetSpec | dg.SourceAsset] = []
    for asset_or_check in [*defs.assets, *(defs.asset_checks or [])]:
        # `Definitions` may also hold cacheable assets, which the code location never builds.
        assert isinstance(asset_or_check, dg.AssetsDefinition | dg.AssetSpec | dg.SourceAsset), asset_or_check
        assets.append(asset_or_check)
    return dg.materialize(
        assets,
        selection=dg.AssetSelection.assets(asset),
        resources=defs.resources,
        instance=instance,
        tags={"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end},
        raise_on_error=False,
    )


# --- more of what the UI sends (runs, steps, checks, health) ------------------------------------------

RUN_DONE = {"SUCCESS", "FAILURE", "CANCELED"}


def launch_run(
    dep: Deployment,
    job: str,
    tags: dict[str, str] | None = None,
    run_config: dict[str, Any] | None = None,
    assets: list[list[str]] | None = None,
) -> str:
    """`launchRun` as the launchpad sends it (an asset job with `assets` as its selection)."""
    selector: dict[str, Any] = {
        "repositoryLocationName": "pcbo",
        "repositoryName": "__repository__",
        "jobName": job,
    }
    if assets is not None:
        selector["assetSelection"] = [{"path": path} for path in assets]
    data = dep.graphql(
        """mutation Launch($params: ExecutionParams!) {
             launchRun(executionParams: $params) {
               __typename
               ... on LaunchRunSuccess { run { runId } }
               ... on PythonError { message stack }
               ... on RunConfigValidationInvalid { errors { message } }
               ... on InvalidSubsetError { message }
               ... on InvalidStepError { invalidStepKey }
             } }""",
        {
            "params": {
                "selector": selector,
                "runConfigData": run_config or {},
                "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]},
            }
        },
    )["launchRun"]
    assert data["__typename"] == "LaunchRunSuccess", data
    return data["run"]["runId"]


def run_info(dep: Deployment, run_id: str) -> dict[str, Any]:
    return dep.graphql(
        """query Run($id: ID!) {
             runOrError(runId: $id) {
               __typename
               ... on Run {
                 runId status jobName
                 tags { key value }
                 stepStats { stepKey status startTime endTime }
               }
             } }""",
        {"id": run_id},
    )["runOrError"]


def wait_for_run(dep: Deployment, run_id: str, timeout: float = 240, statuses: set[str] = RUN_DONE) -> dict:
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        dep.assert_alive()
        info = run_info(dep, run_id)
        if info.get("status") in statuses:
            return info
        time.sleep(1)
    raise AssertionError(f"run {run_id} not {statuses} in {timeout} s: {info}\n{dep.logs()}")


def wait_for(what: str, probe: Any, dep: Deployment, timeout: float = 180, every: float = 2) -> Any:
    """Poll `probe()` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dep.assert_alive()
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not seen in {timeout} s\n{dep.logs()}")


def runs_with_tag(dep: Deployment, key: str, value: str | None = None) -> list[dict[str, Any]]:
    """The newest runs (the Runs page) that carry the tag `key` (with `value` when given)."""
    runs = dep.graphql(
        """{ runsOrError(limit: 100) {
               ... on Runs { results { runId status jobName tags { key value } } }
             } }"""
    )["runsOrError"]["results"]
    return [
        r for r in runs if any(t["key"] == key and (value is None or t["value"] == value) for t in r["tags"])
    ]


def check_partition_statuses(dep: Deployment, asset: list[str], check: str) -> dict[str, list[str]]:
    """{status: [partition keys]} of a partitioned check, from the check's Partitions tab query."""
    checks = dep.graphql(
        """query Checks($key: AssetKeyInput!) {
             assetNodeOrError(assetKey: $key) {
               ... on AssetNode {
                 assetChecksOrError {
                   ... on AssetChecks {
                     checks {
                       name
                       partitionKeysByDimension { partitionKeys }
                       partitionStatuses {
                         __typename
                         ... on AssetCheckTimePartitionStatuses { ranges { status startKey endKey } }
                         ... on AssetCheckDefaultPartitionStatuses {
                           succeededPartitions failedPartitions inProgressPartitions skippedPartitions
                           executionFailedPartitions
                         }
                       }
                     }
                   }
                 }
               }
             } }""",
        {"key": {"path": asset}},
    )["assetNodeOrError"]["assetChecksOrError"]["checks"]
    [found] = [c for c in checks if c["name"] == check]
    statuses = found["partitionStatuses"]
    out: dict[str, list[str]] = {}
    if statuses is None:
        return out
    if statuses["__typename"] == "AssetCheckTimePartitionStatuses":
        all_keys = found["partitionKeysByDimension"][0]["partitionKeys"]
        position = {k: i for i, k in enumerate(all_keys)}
        for r in statuses["ranges"]:
            keys = all_keys[position[r["startKey"]] : position[r["endKey"]] + 1]
            out.setdefault(r["status"], []).extend(keys)
        return out
    for name, status in (
        ("succeededPartitions", "SUCCEEDED"),
        ("failedPartitions", "FAILED"),
        ("inProgressPartitions", "IN_PROGRESS"),
        ("skippedPartitions", "SKIPPED"),
        ("executionFailedPartitions", "EXECUTION_FAILED"),
    ):
        if statuses[name]:
            out[status] = statuses[name]
    return out


def asset_checks_status(dep: Deployment, asset: list[str]) -> dict[str, str | None]:
    """{check: status of its execution for the latest materialization} of an asset: what the OSS UI's
    catalog, asset graph and asset page header read for the asset's check health (the `assetHealth`
    field is null on an OSS instance). A failed ERROR check there is a red asset."""
    checks = dep.graphql(
        """query Live($key: AssetKeyInput!) {
             assetNodeOrError(assetKey: $key) {
               ... on AssetNode {
                 assetChecksOrError {
                   ... on AssetChecks {
                     checks { name executionForLatestMaterialization { status evaluation { severity } } }
                   }
                 }
               }
             } }""",
        {"key": {"path": asset}},
    )["assetNodeOrError"]["assetChecksOrError"]["checks"]
    return {c["name"]: (c["executionForLatestMaterialization"] or {}).get("status") for c in checks}


def asset_unhealthy(dep: Deployment, asset: list[str]) -> bool:
    """Whether the catalog shows the asset's checks failing (any check failed for its latest state)."""
    return any(status == "FAILED" for status in asset_checks_status(dep, asset).values())


def materialized_partitions(dep: Deployment, asset: list[str]) -> list[str]:
    """The asset's materialized partitions as its Partitions tab shows them."""
    node = dep.graphql(
        """query Parts($key: AssetKeyInput!) {
             assetNodeOrError(assetKey: $key) {
               ... on AssetNode {
                 partitionKeysByDimension { partitionKeys }
                 assetPartitionStatuses {
                   __typename
                   ... on TimePartitionStatuses { ranges { status startKey endKey } }
                   ... on DefaultPartitionStatuses { materializedPartitions }
                 }
               }
             } }""",
        {"key": {"path": asset}},
    )["assetNodeOrError"]
    statuses = node["assetPartitionStatuses"]
    if statuses["__typename"] == "DefaultPartitionStatuses":
        return sorted(statuses["materializedPartitions"])
    all_keys = node["partitionKeysByDimension"][0]["partitionKeys"]
    position = {k: i for i, k in enumerate(all_keys)}
    out: list[str] = []
    for r in statuses["ranges"]:
        if r["status"] == "MATERIALIZED":
            out += all_keys[position[r["startKey"]] : position[r["endKey"]] + 1]
    return sorted(out)


def latest_events(dep: Deployment, asset: list[str], partitions: list[str] | None = None) -> dict[str, Any]:
    """The asset's materializations and observations, newest first (its Events tab)."""
    return dep.graphql(
        """query Events($key: AssetKeyInput!, $partitions: [String!]) {
             assetOrError(assetKey: $key) {
               ... on Asset {
                 assetMaterializations(partitions: $partitions) {
                   partition runId description timestamp
                   metadataEntries { __typename label ... on TextMetadataEntry { text }
                                     ... on IntMetadataEntry { intValue } }
                 }
                 assetObservations {
                   partition runId description timestamp
                   metadataEntries { __typename label ... on TextMetadataEntry { text } }
                 }
               }
             } }""",
        {"key": {"path": asset}, "partitions": partitions},
    )["assetOrError"]


def terminate(dep: Deployment, run_id: str) -> None:
    """The run page's Terminate button."""
    data = dep.graphql(
        """mutation Terminate($id: String!) {
             terminateRun(runId: $id, terminatePolicy: SAFE_TERMINATE) {
               __typename ... on TerminateRunFailure { message } ... on PythonError { message }
             } }""",
        {"id": run_id},
    )["terminateRun"]
    assert data["__typename"] == "TerminateRunSuccess", data
