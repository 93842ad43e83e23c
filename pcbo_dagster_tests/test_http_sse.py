"""The reconciliation stream (Server-Sent Events) of a real server: heartbeat timing, event order,
clients that disconnect, and a client that does not read."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("httpx_sse")

from httpx_sse import connect_sse  # noqa: E402

from pcbo_dagster_tests.http_server import DEMO_REQUEST, running_server  # noqa: E402


def _collect(client, seconds: float, stop=None) -> list[tuple[float, str, dict, int]]:
    """(time, event type, data, id) of the events read for `seconds` (or until `stop(events)`)."""
    events = []
    started = time.monotonic()
    with connect_sse(client, "GET", "/reconciliation/stream") as source:
        for sse in source.iter_sse():
            if not sse.data:  # the opening comment and retry field
                continue
            events.append((time.monotonic() - started, sse.event, json.loads(sse.data), int(sse.id)))
            if time.monotonic() - started > seconds or (stop is not None and stop(events)):
                break
    return events


def _status(client) -> dict:
    return client.get("/v1/admin/status").json()["eventStream"]


def test_heartbeat_every_interval_whatever_else_is_sent(tmp_path):
    with running_server(tmp_path / "home", heartbeat_seconds=0.3, reconcile_seconds=0.05) as server:
        writer = server.client(server.token("operator", "execute"))
        assert writer.post("/v1/execute", content=DEMO_REQUEST.read_bytes()).status_code == 200
        events = _collect(server.client(server.token("viewer", "read")), 2.0)
    beats = [at for at, kind, _, _ in events if kind == "heartbeat"]
    assert 5 <= len(beats) <= 8, beats
    gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
    assert all(0.15 <= gap <= 0.6 for gap in gaps), gaps
    assert sum(kind == "reconciliation.update" for _, kind, _, _ in events) >= 5  # updates between beats


def test_events_arrive_in_order_with_run_and_command_phases(tmp_path):
    with running_server(tmp_path / "home", heartbeat_seconds=5, reconcile_seconds=0.2) as server:
        client = server.client(server.token("operator", "admin"))
        received: list = []

        def listen() -> None:
            received.extend(
                _collect(
                    client,
                    30,
                    stop=lambda ev: (
                        any(k == "command.status" and d["phase"] == "success" for _, k, d, _ in ev)
                        and any(
                            k == "reconciliation.update"
                            and d["status"] == "verified"
                            and d["counts"]["partitions"] == 6
                            for _, k, d, _ in ev
                        )
                    ),
                )
            )

        listener = threading.Thread(target=listen)
        listener.start()
        time.sleep(0.5)
        accepted = client.post(
            "/v1/execute", content=DEMO_REQUEST.read_bytes(), headers={"Prefer": "respond-async"}
        )
        assert accepted.status_code == 202
        deadline = time.monotonic() + 30
        while client.get("/v1/runs/demo-run-001").json()["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        client.post("/commands/run", json={"commandId": "verify-order", "action": "verify", "target": "all"})
        listener.join(40)
    ids = [event_id for _, _, _, event_id in received]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    runs = [d["status"] for _, kind, d, _ in received if kind == "run.status"]
    assert runs == ["queued", "running", "done"]
    progress = [(d["done"], d["total"]) for _, kind, d, _ in received if kind == "run.progress"]
    assert progress[0][0] == 0 and progress[-1][0] == progress[-1][1] == 6
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    phases = [d["phase"] for _, kind, d, _ in received if kind == "command.status"]
    assert phases == ["queued", "running", "success"]
    updates = [d for _, kind, d, _ in received if kind == "reconciliation.update"]
    assert updates and updates[-1]["service"] == "demo-events"
    assert {"eventId", "service", "status", "counts", "checksum", "latencyMs", "discrepancyDetails"} <= set(
        updates[-1]
    )
    assert {u["status"] for u in updates} <= {
        "verified",
        "stale",
    }  # stale: while a run or verify holds the lease
    assert any(u["status"] == "verified" and u["counts"]["partitions"] == 6 for u in updates)


def test_a_token_for_one_dataset_streams_nothing_of_another(tmp_path):
    with running_server(tmp_path / "home", heartbeat_seconds=0.3, reconcile_seconds=0.1) as server:
        client = server.client(server.token("operator", "admin"))
        demo = json.loads(DEMO_REQUEST.read_text())
        other = json.dumps({**demo, "dataset": "other-events", "runId": "other-1", "table": None}).encode()
        assert client.post("/v1/execute", content=other).status_code == 200
        limited = server.client(server.token("team-other", "read", datasets=["other-events"]))
        received: list = []
        listener = threading.Thread(target=lambda: received.extend(_collect(limited, 2.5)))
        listener.start()
        time.sleep(0.3)
        assert client.post("/v1/execute", content=DEMO_REQUEST.read_bytes()).status_code == 200
        client.post("/commands/run", json={"commandId": "gc-all", "action": "gc", "target": "all"})
        listener.join(10)
    kinds = {kind for _, kind, _, _ in received}
    assert "heartbeat" in kinds and "reconciliation.update" in kinds
    assert "command.status" not in kinds  # a gc is about every dataset
    datasets = {d.get("service") or d.get("dataset") for _, kind, d, _ in received if kind != "heartbeat"}
    assert datasets == {"other-events"}


def test_a_discrepancy_is_streamed_and_logged(tmp_path):
    with running_server(tmp_path / "home", heartbeat_seconds=5, reconcile_seconds=0.1) as server:
        client = server.client(server.token("operator", "admin"))
        assert client.post("/v1/execute", content=DEMO_REQUEST.read_bytes()).status_code == 200
        manifest = next((server.home / "lake" / "demo-events" / "v1").glob("*/_manifest.json"))
        manifest.unlink()  # the commit point of one partition is gone
        events = _collect(
            client,
            20,
            stop=lambda ev: any(d.get("status") == "discrepancy" for _, k, d, _ in ev if k != "heartbeat"),
        )
        update = next(
            d for _, k, d, _ in events if k == "reconciliation.update" and d["status"] == "discrepancy"
        )
        assert update["discrepancyDetails"]["missingIds"] == [manifest.parent.name]
        assert update["discrepancyDetails"]["expected"]["partitions"] == 6
        assert update["discrepancyDetails"]["actual"]["lakePartitions"] == 5
        time.sleep(0.5)  # more polls: the same discrepancy is logged once
        logged = [d for d in server.catalog.discrepancies() if d["kind"] == "reconciliation_discrepancy"]
        assert len(logged) == 1 and logged[0]["partition_key"] == manifest.parent.name
        audit = client.get(
            "/reconciliation/audit", params={"actionType": "reconciliation_discrepancy"}
        ).json()
        assert audit["meta"]["total"] == 1


def test_clients_that_disconnect_are_cleaned_up(tmp_path):
    with running_server(tmp_path / "home", heartbeat_seconds=0.2, reconcile_seconds=5) as server:
        client = server.client(server.token("operator", "admin"))
        streams = [server.client(server.token(f"viewer-{i}", "read")) for i in range(3)]
        for viewer in streams:
            _collect(viewer, 0.3)  # opened, read a little, closed
        deadline = time.monotonic() + 10
        while _status(client)["subscribers"] != 0:
            assert time.monotonic() < deadline, _status(client)
            time.sleep(0.05)
        assert _status(client)["dropped"] == 0


def test_a_client_that_does_not_read_is_dropped_and_blocks_no_one(tmp_path):
    with running_server(
        tmp_path / "home", send_buffer=4096, heartbeat_seconds=1, reconcile_seconds=0.002, sse_queue_size=8
    ) as server:
        client = server.client(server.token("operator", "admin"))
        demo = json.loads(DEMO_REQUEST.read_text())
        for i in range(3):  # three datasets: three updates a poll
            changes = {"dataset": f"events-{i}", "runId": f"run-{i}", "table": None}
            request = json.dumps({**demo, **changes}).encode()
            assert client.post("/v1/execute", content=request).status_code == 200
        token = server.token("sleepy", "read")
        port = int(server.url.rsplit(":", 1)[1])
        slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # a small window, never read
        slow.connect(("127.0.0.1", port))
        slow.sendall(
            b"GET /reconciliation/stream HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        try:
            good: list = []
            started = time.monotonic()

            def dropped(events) -> bool:
                good[:] = events
                return _status(client)["dropped"] >= 1 if len(events) % 50 == 0 else False

            events = _collect(server.client(server.token("reader", "read")), 90, stop=dropped)
            assert _status(client)["dropped"] == 1, "the slow client was not dropped"
            elapsed = time.monotonic() - started
            # The reader kept receiving all along: never a gap longer than a heartbeat.
            times = [at for at, _, _, _ in events]
            assert max(b - a for a, b in zip(times, times[1:], strict=False)) < 1.5
            assert len(events) > 50 and elapsed < 90
            # The slow client's connection is closed (its last event could not be written in time).
            slow.settimeout(10)
            received = b""
            while chunk := slow.recv(65536):
                received += chunk
            assert received.startswith(b"HTTP/1.1 200")
        finally:
            slow.close()
