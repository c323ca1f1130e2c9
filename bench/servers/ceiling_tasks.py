"""The previous ceiling, kept as the `ceiling-tasks` row: a queue and a writer task per connection.

No Starlette, no broadcaster, no heartbeat, no limits: one Redis pub/sub connection per
process (redis-py), one reader task, a dict of groups of connections, and per connection a
queue and a task that writes it with the ASGI `send`. `bench/servers/ceiling.py` (the
`ceiling` stack) drives the sends without a task per connection; the gap between the two rows
is what a task per delivery costs. Same producers as the ceiling (`ceiling.py`).

    BENCH_REDIS_URL=redis://127.0.0.1:6379 BENCH_JWT_SECRET=... \\
    python -m uvicorn bench.servers.ceiling_tasks:app --loop uvloop --http httptools \\
        --ws websockets-sansio --ws-per-message-deflate false --no-access-log
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import redis.asyncio as redis

# The protocol's side is the ceiling's own: only the delivery differs.
from bench.servers.ceiling import PATH, PONG, SUBPROTOCOL, channel_name, http, verify

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def strip_position(data: str) -> str:
    """The update's JSON: the sync producer runs our publish script, which prefixes the
    `<epoch>:<seq> ` position; the async one PUBLISHes the bare JSON."""
    return data if data.startswith("{") else data.partition(" ")[2]


class Connection:
    """One WebSocket's `send` and the updates still to be sent to it, in order."""

    __slots__ = ("backlog", "group", "pump", "send")

    def __init__(self, send: Send, group: set[Connection]) -> None:
        self.send = send
        self.group = group
        self.backlog: deque[Message] = deque()
        self.pump: asyncio.Task[None] | None = None

    def deliver(self, event: Message) -> None:
        self.backlog.append(event)
        if self.pump is None:
            self.pump = asyncio.create_task(self.drain())

    async def drain(self) -> None:
        try:
            while self.backlog:
                await self.send(self.backlog.popleft())
        except Exception:
            self.backlog.clear()
            self.group.discard(self)
        finally:
            self.pump = None


class Hub:
    """The process's one pub/sub connection, its reader task and the groups it fans out to."""

    def __init__(self) -> None:
        # Keyed by the channel as Redis sends it back, so the reader does no parsing.
        self.groups: dict[bytes, set[Connection]] = {}
        self.client: redis.Redis | None = None
        self.pubsub: Any = None
        self.reader: asyncio.Task[None] | None = None

    async def start(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        # Connected before the first SUBSCRIBE so the reader can block on the socket at once.
        await self.pubsub.connect()
        self.reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        if self.pubsub is not None:
            await self.pubsub.aclose()
        if self.client is not None:
            await self.client.aclose()

    async def join(self, channel: bytes, send: Send) -> Connection:
        group = self.groups.get(channel)
        if group is not None:
            connection = Connection(send, group)
            group.add(connection)
            return connection
        group = self.groups[channel] = set()
        connection = Connection(send, group)
        group.add(connection)
        await self.pubsub.subscribe(channel)
        return connection

    async def leave(self, channel: bytes, connection: Connection) -> None:
        group = connection.group
        group.discard(connection)
        if not group and self.groups.get(channel) is group:
            del self.groups[channel]
            await self.pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        get_message = self.pubsub.get_message
        groups = self.groups
        while True:
            message = await get_message(timeout=None)
            if message is None or message["type"] != "message":
                continue
            group = groups.get(message["channel"])
            if not group:
                continue
            event = {"type": "websocket.send", "text": strip_position(message["data"].decode())}
            # Each connection is written by its own task, so one that flow control pauses holds
            # up only itself; awaiting every send here in turn stalled the whole fan-out (over a
            # third of a burst's time) behind whichever client was slowest to read. The reader
            # also runs ahead of the pumps in a burst, so each writes several frames in a row.
            for connection in group:
                connection.deliver(event)


hub = Hub()


async def websocket(scope: Scope, receive: Receive, send: Send) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    match = PATH.fullmatch(scope["path"])
    if match is None or not verify(scope, os.environ["BENCH_JWT_SECRET"]):
        await send({"type": "websocket.close", "code": 4401})
        return
    dream_id = int(match.group(1))
    channel = channel_name(dream_id).encode()
    await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
    established = json.dumps({"type": "connection_established", "dream_id": dream_id})
    await send({"type": "websocket.send", "text": established})
    connection = await hub.join(channel, send)
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text and json.loads(text).get("type") == "ping":
                await send(PONG)
    finally:
        await hub.leave(channel, connection)


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await hub.start(os.environ["BENCH_REDIS_URL"])
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await hub.stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    kind = scope["type"]
    if kind == "websocket":
        await websocket(scope, receive, send)
    elif kind == "lifespan":
        await lifespan(receive, send)
    elif kind == "http":
        await http(scope, send)
