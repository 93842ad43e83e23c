"""A real `pcbo serve` for the tests: uvicorn on a free loopback port, in a thread of the test process
(`running_server`) or as a `pcbo serve` subprocess (`serve_process`), each over its own PCBO_HOME; and
tokens for it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster_tests.cli_runner import pcbo_env
from pcbo_dagster_tests.loopback import free_port, stop_process_group

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_REQUEST = REPO_ROOT / "examples" / "demo_request.json"


@dataclass
class RunningServer:
    url: str
    home: Path
    catalog: CatalogStore
    app: Any = None
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, subject: str, *scopes: str, datasets: list[str] | None = None) -> str:
        _, secret = self.catalog.create_token(subject, scopes, datasets)
        return secret

    def client(self, token: str | None = None, timeout: float = 120.0) -> httpx.Client:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


@contextmanager
def running_server(
    home: Path,
    environ: dict[str, str] | None = None,
    send_buffer: int | None = None,
    catalog_url: str | None = None,
    **changes: Any,
) -> Iterator[RunningServer]:
    """`pcbo serve` on `home` in a thread of this process (ServerConfig fields in `changes`).
    `send_buffer`: the kernel send buffer of every connection (SO_SNDBUF, inherited from the
    listening socket), to see a client that does not read without filling megabytes first.
    `catalog_url`: its catalog (default: the home's SQLite catalog)."""
    import uvicorn

    from pcbo_dagster.server.app import create_app, uvicorn_options
    from pcbo_dagster.server.config import ServerConfig

    config = ServerConfig.from_environment(
        Settings.resolve(home=str(home), catalog=catalog_url, env={}), environ or {}
    )
    config = config.with_changes(**changes)
    app = create_app(config)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    options = {**uvicorn_options(config), "timeout_graceful_shutdown": 30}  # (`pcbo serve`'s)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options))
    thread = threading.Thread(
        target=lambda: server.run(sockets=[listener]), name="pcbo-test-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    catalog = CatalogStore(config.engine.catalog_url)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", home, catalog, app)
    finally:
        from pcbo_dagster.server.app import begin_shutdown

        begin_shutdown(app)
        server.should_exit = True
        thread.join(60)
        listener.close()
        catalog.close()


@contextmanager
def serve_process(
    home: Path, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`pcbo serve` as a subprocess (its own process group) on `home`; stopped with SIGTERM."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = pcbo_env(home, env)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    out = open(log or home.parent / "serve.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "pcbo_dagster.cli.main", "serve", "--port", str(port)],
        env=environment,
        cwd=home.parent,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"pcbo serve exited with {process.returncode}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("pcbo serve did not answer within 60 s")
            time.sleep(0.1)
        yield url, process
    finally:
        stop_process_group(process, 60)
        out.close()


def lake_files(home: Path) -> dict[str, bytes]:
    """Every file of a home's lake by its path inside the lake (temp files and the Iceberg table's
    own metadata, which has random ids by design, excluded)."""
    lake = home / "lake"
    return {
        str(path.relative_to(lake)): path.read_bytes()
        for path in sorted(lake.rglob("*"))
        if path.is_file() and ".tmp-" not in path.name and not path.relative_to(lake).parts[0] == "_iceberg"
    }
