"""Loopback ports for the real servers the tests start (PostgreSQL, Redis, moto, the GCS emulator,
uvicorn, dagster-webserver)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server started next binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
