"""Requests/s and p50/p99 latency of `POST /v1/plan` and `POST /v1/dry-run` of `pcbo serve`, with 1, 8 and
32 concurrent clients, while 50 SSE clients hold `/reconciliation/stream` open.

`python benchmarks/http_benchmark.py [--requests 400] [--seconds 15] [--sse 50] [--save]`

Loopback only: the server is a real `pcbo serve` subprocess on 127.0.0.1 over a temporary PCBO_HOME
(one uvicorn worker, the defaults), the token comes from `pcbo token create`, the request is
`examples/demo_request.json` (6 partitions, 122 records). Each cell sends up to `--requests` requests or
runs for `--seconds`, whichever ends first, after 20 warm-up requests; the load generator (httpx,
asyncio) runs on the same machine, so it shares the CPUs with the server. Every answer must be 200.
The demo request is executed first, so the reconciliation poll (every second) sends each of the SSE
clients an update a second; they read their streams throughout and must all still be connected at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REQUEST = REPO / "examples" / "demo_request.json"
CONCURRENCY = (1, 8, 32)
ENDPOINTS = ("plan", "dry-run")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def hold_stream(client: httpx.AsyncClient, counts: list[int], index: int, stop: asyncio.Event) -> None:
    async with client.stream("GET", "/reconciliation/stream") as response:
        assert response.status_code == 200, response.status_code
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                counts[index] += 1
            if stop.is_set():
                return


async def burst(url: str, token: str, endpoint: str, concurrency: int, requests: int, seconds: float) -> dict:
    body = REQUEST.read_bytes()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:
        for _ in range(20):  # warm-up
            assert (await client.post(f"/v1/{endpoint}", content=body)).status_code == 200
        latencies: list[float] = []
        sent = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal sent
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                started = time.perf_counter()
                answer = await client.post(f"/v1/{endpoint}", content=body)
                latencies.append(time.perf_counter() - started)
                assert answer.status_code == 200, answer.text[:200]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "endpoint": f"/v1/{endpoint}",
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": round(wall, 3),
        "requestsPerSecond": round(len(latencies) / wall, 1),
        "p50Ms": round(percentile(latencies, 0.50) * 1000, 1),
        "p99Ms": round(percentile(latencies, 0.99) * 1000, 1),
        "meanMs": round(statistics.fmean(latencies) * 1000, 1),
    }


async def run_all(url: str, token: str, args: argparse.Namespace) -> tuple[list[dict], dict]:
    headers = {"Authorization": f"Bearer {token}"}
    stop = asyncio.Event()
    counts = [0] * args.sse
    sse_client = httpx.AsyncClient(
        base_url=url,
        headers=headers,
        timeout=httpx.Timeout(60, read=None),
        limits=httpx.Limits(max_connections=args.sse + 1),
    )
    streams = [asyncio.create_task(hold_stream(sse_client, counts, i, stop)) for i in range(args.sse)]
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as admin:
        # One dataset in the lake, so the reconciliation poll sends every SSE client an update a second.
        assert (await admin.post("/v1/execute", content=REQUEST.read_bytes())).status_code == 200
        for _ in range(100):
            if (await admin.get("/v1/admin/status")).json()["eventStream"]["subscribers"] >= args.sse:
                break
            await asyncio.sleep(0.1)
        rows = []
        for endpoint in ENDPOINTS:
            for concurrency in CONCURRENCY:
                row = await burst(url, token, endpoint, concurrency, args.requests, args.seconds)
                rows.append(row)
                print(json.dumps(row), flush=True)
        status = (await admin.get("/v1/admin/status")).json()["eventStream"]
    stop.set()
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    await sse_client.aclose()
    sse = {
        "clients": args.sse,
        "connectedAtEnd": status["subscribers"],
        "dropped": status["dropped"],
        "eventsPerClientMin": min(counts) if counts else 0,
    }
    return rows, sse


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="at most this many requests a cell")
    parser.add_argument("--seconds", type=float, default=15.0, help="at most this long a cell")
    parser.add_argument("--sse", type=int, default=50, help="SSE clients held open during the bursts")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/http-<date>.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pcbo-http-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCBO_")}
    env.update(PCBO_HOME=str(work / "home"), PCBO_RECONCILE_SECONDS="1")
    pcbo = [sys.executable, "-m", "pcbo_dagster.cli.main"]
    created = subprocess.run(
        [*pcbo, "token", "create", "--subject", "benchmark", "--scope", "admin"],
        env=env,
        capture_output=True,
        check=True,
        cwd=work,
    )
    token = json.loads(created.stdout)["token"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [*pcbo, "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        load_before = os.getloadavg()
        rows, sse = asyncio.run(run_all(url, token, args))
        load_after = os.getloadavg()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    print()
    print(f"| endpoint | clients | requests | req/s | p50 ms | p99 ms |  (SSE clients open: {sse})")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| `{row['endpoint']}` | {row['concurrency']} | {row['requests']} | {row['requestsPerSecond']} "
            f"| {row['p50Ms']} | {row['p99Ms']} |"
        )
    print(f"load average before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    if args.save:
        out = HERE / "results" / f"http-{datetime.now():%Y-%m-%d}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "sse": sse,
                    "loadBefore": load_before,
                    "loadAfter": load_after,
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
