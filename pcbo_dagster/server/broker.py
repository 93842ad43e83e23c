"""The Server-Sent Events broker: every event goes to every subscriber allowed to see it, in the order
published, through a bounded queue per subscriber.

A subscriber whose queue is full (a client that does not read) is dropped: its queue is emptied, a
last `dropped` event with the reason is put in it, and its stream ends; if the client cannot even
take that within a short grace, its connection is closed. It never holds up the publisher or the
other subscribers. A client that disconnects is unsubscribed when its stream ends.

`publish` may be called from any thread (the workers running executes and commands, the
reconciliation poller); delivery happens on the event loop, in publication order.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("pcbo.server.sse")
#: The `dataset` of an event about every dataset (a gc, a verify): seen only by subscribers whose
#: token reaches every dataset (no dataset name can be `*`).
EVERY_DATASET = "*"


@dataclass(frozen=True)
class ServerEvent:
    """One SSE event: `id:` (increasing per server), `event:` and a JSON `data:` line."""

    id: int
    type: str
    data: dict[str, Any]
    #: The dataset the event is about; `EVERY_DATASET`: about all of them; None: about none in
    #: particular (heartbeats: seen by every subscriber).
    dataset: str | None = None

    def encode(self) -> bytes:
        body = json.dumps(self.data, separators=(",", ":"), ensure_ascii=False)
        return f"id: {self.id}\nevent: {self.type}\ndata: {body}\n\n".encode()


@dataclass(eq=False)
class Subscriber:
    queue: asyncio.Queue[ServerEvent]
    #: The datasets this subscriber may see; None: all.
    datasets: frozenset[str] | None
    dropped: str | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Whether the client's token still holds (not revoked, not expired): asked at each heartbeat,
    #: in a thread (it reads the catalog); None: never asked.
    authorized: Callable[[], bool] | None = None
    #: The token the stream was opened with (streams per token are bounded: `streams_of`).
    token_id: str | None = None

    def allowed(self, event: ServerEvent) -> bool:
        return event.dataset is None or self.datasets is None or event.dataset in self.datasets


class EventBroker:
    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self._subscribers: set[Subscriber] = set()
        self._ids = itertools.count(1)
        self._id_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dropped_total = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop delivery happens on (the server's)."""
        self._loop = loop

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def streams_of(self, token_id: str) -> int:
        """How many streams the token has open."""
        return sum(1 for s in self._subscribers if s.token_id == token_id)

    def subscribe(
        self,
        datasets: frozenset[str] | None,
        authorized: Callable[[], bool] | None = None,
        token_id: str | None = None,
    ) -> Subscriber:
        subscriber = Subscriber(
            asyncio.Queue(maxsize=self.queue_size), datasets, authorized=authorized, token_id=token_id
        )
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def publish(self, event_type: str, data: dict[str, Any], dataset: str | None = None) -> None:
        """Queue an event for every subscriber allowed to see it (any thread)."""
        with self._id_lock:
            event = ServerEvent(next(self._ids), event_type, data, dataset)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._deliver(event)
        else:
            try:
                loop.call_soon_threadsafe(self._deliver, event)
            except RuntimeError:  # the loop closed in between: the server is gone
                pass

    def _deliver(self, event: ServerEvent) -> None:
        for subscriber in list(self._subscribers):
            if not subscriber.allowed(event):
                continue
            try:
                subscriber.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._drop(subscriber, f"slow client: {self.queue_size} events were waiting unread")

    def _drop(self, subscriber: Subscriber, reason: str) -> None:
        self._subscribers.discard(subscriber)
        subscriber.dropped = reason
        while not subscriber.queue.empty():
            subscriber.queue.get_nowait()
        with self._id_lock:
            last = ServerEvent(next(self._ids), "dropped", {"reason": reason})
        subscriber.queue.put_nowait(last)
        subscriber.closed.set()
        self.dropped_total += 1
        log.warning("sse client dropped: %s", reason)

    def close_all(self, reason: str) -> None:
        """End every stream (the server is shutting down): each gets a last `dropped` event."""
        for subscriber in list(self._subscribers):
            self._drop(subscriber, reason)


async def event_stream(
    broker: EventBroker,
    subscriber: Subscriber,
    heartbeat_seconds: float,
    clock: Callable[[], float] | None = None,
) -> AsyncGenerator[bytes, None]:
    """The bytes of one client's stream: a comment to open it, the subscriber's events as they come,
    and a `heartbeat` event every `heartbeat_seconds` whatever else is sent. Before each heartbeat the
    subscriber's token is asked again (`Subscriber.authorized`): a revoked or expired one is dropped.
    Ends after a `dropped` event; unsubscribes when it ends, however it ends (the client went away:
    cancelled)."""
    loop = asyncio.get_running_loop()
    now = clock or loop.time
    try:
        yield b": pcbo event stream\nretry: 3000\n\n"
        next_beat = now() + heartbeat_seconds
        while True:
            wait = next_beat - now()
            if wait <= 0:
                check = subscriber.authorized
                if check is not None and not await asyncio.to_thread(check):
                    broker._drop(subscriber, "the token was revoked or has expired")
                    next_beat = now() + heartbeat_seconds
                    continue  # the `dropped` event is next in the queue
                beat = {"at": _utc_text(), "subscribers": broker.subscriber_count}
                with broker._id_lock:
                    event = ServerEvent(next(broker._ids), "heartbeat", beat)
                yield event.encode()
                next_beat += heartbeat_seconds
                if next_beat <= now():  # fell behind (a slow write): no burst of heartbeats
                    next_beat = now() + heartbeat_seconds
                continue
            try:
                event = await asyncio.wait_for(subscriber.queue.get(), timeout=wait)
            except TimeoutError:
                continue
            yield event.encode()
            if event.type == "dropped":
                return
    finally:
        broker.unsubscribe(subscriber)


def _utc_text() -> str:
    from pcbo_dagster.core.instants import format_datetime
    from pcbo_dagster.io.clock import utc_now

    return format_datetime(utc_now().replace(microsecond=0))


class EventStreamResponse(Response):
    """The ASGI answer of `GET /reconciliation/stream`: streams `event_stream`, ends when the client
    disconnects, and closes the connection of a dropped client that has not taken its last event
    within `drop_grace` seconds (its writes are blocked: it does not read)."""

    media_type = "text/event-stream"

    def __init__(
        self, broker: EventBroker, subscriber: Subscriber, heartbeat_seconds: float, drop_grace: float
    ) -> None:
        super().__init__(media_type=self.media_type)
        self.broker = broker
        self.subscriber = subscriber
        self.events = event_stream(broker, subscriber, heartbeat_seconds)
        self.drop_grace = drop_grace

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        import anyio

        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]

        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def until_disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        async def close_when_dropped() -> None:
            await self.subscriber.closed.wait()
            await anyio.sleep(self.drop_grace)

        try:
            async with anyio.create_task_group() as group:

                async def first_to_end(func: Callable[[], Any]) -> None:
                    await func()
                    group.cancel_scope.cancel()

                group.start_soon(first_to_end, stream)
                group.start_soon(first_to_end, close_when_dropped)
                await first_to_end(until_disconnected)
        finally:
            self.broker.unsubscribe(self.subscriber)
            await self.events.aclose()
