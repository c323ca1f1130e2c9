"""The ceiling of our own stack: the fastest bare-ASGI fan-out server we can write on uvicorn.

Same protocol as the other stacks (bench/README.md), nothing else: no Starlette, no broadcaster,
no heartbeat, no per-user limits. What it does per update, and why each step is the cheapest:

* One Redis connection per process, read by an `asyncio.Protocol` with hiredis' C parser: a
  published message is parsed and fanned out inside `data_received`, with no reader task to wake
  and no per-message client machinery (redis-py's `get_message` costs more than the fan-out of a
  small dream).
* The update's JSON arrives finished and goes out as is: one `websocket.send` event per update,
  built once and handed to every connection of the dream.
* One pass over the dream's connections, calling each ASGI `send` and driving the coroutine it
  returns by hand (`coro.send(None)`): uvicorn's websockets-sansio `send` completes without
  suspending unless the transport is paused, so a delivery costs a coroutine and no task, future
  or queue. Only a send that does suspend gets a task, which finishes it and then writes that
  connection's backlog (the updates that came meanwhile) in order; the connection rejoins the
  fast pass when its backlog is empty. A backlog past `MAX_PENDING` updates (as ours and the
  other stacks bound theirs) drops the connection, closing it with 1013.

Micro-benchmarked, a send awaited inside the pass costs about 0.4 µs of Python on top of
uvicorn's own work, a send driven by hand each (`coro.send(None)`, a StopIteration per send)
0.9 µs, a task per send (`ceiling_tasks.py`, or `asyncio.gather` per dream) several µs more.

Producers (`CeilingPublisher`, `SyncCeilingPublisher`): the async one PUBLISHes the finished
JSON; the sync one, a bare redis-py client, runs the very script ours runs per publish (next
position, capped stream, PUBLISH of `<epoch>:<seq> <json>`), so that its producer cost is that of
the same Redis work with nothing on top; the reader strips the position.

    BENCH_REDIS_URL=redis://127.0.0.1:6379 BENCH_JWT_SECRET=... \\
    python -m uvicorn bench.servers.ceiling:app --loop uvloop --http httptools \\
        --ws websockets-sansio --ws-per-message-deflate false --no-access-log
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, MutableMapping
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis
import jwt
import redis
import redis.asyncio as aioredis

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SUBPROTOCOL = "dream-ws.v1"
TOKEN_PREFIX = "dream-ws.bearer."
PATH = re.compile(r"/dreams/(\d+)")
PONG = {"type": "websocket.send", "text": '{"type":"pong"}'}
HEALTH_BODY = b'{"status":"ok","backend_connected":true}'
#: Updates a connection may have waiting before it is dropped (ours: `max_pending_events`).
MAX_PENDING = 1000
#: The close code of a connection dropped for falling behind ("try again later").
TOO_SLOW = 1013
CONFIRM_TIMEOUT = 5.0


def channel_name(dream_id: int) -> str:
    return f"dream_images_{dream_id}"


def resp_command(*parts: str) -> bytes:
    encoded = [part.encode() for part in parts]
    return b"".join([b"*%d\r\n" % len(encoded), *(b"$%d\r\n%s\r\n" % (len(p), p) for p in encoded)])


@types.coroutine
def hand_over(yielded: Any) -> Generator[Any, Any, Any]:
    """Yield what the suspended `send` yielded to the task, unchanged, and return what the task
    sends back: the task then drives the coroutine exactly as an `await` would have."""
    return (yield yielded)


async def _pass(sends: list[Send], start: int, event: Message, state: list[Any]) -> None:
    """One pass of the fan-out from `sends[start]` on. Sends are awaited here, in one coroutine
    driven by hand, rather than each driven by hand: a send that completes then costs no
    StopIteration, a third of the cost of the call. `state[0]` says which send is in progress
    when the pass suspends; once `state[1]` is set (a task has taken the pass over) it ends with
    that send."""
    for index in range(start, len(sends)):
        state[0] = index
        await sends[index](event)
        if state[1]:
            return


class Connection:
    """One WebSocket: its ASGI `send`, and while a send is suspended, the updates behind it."""

    __slots__ = ("backlog", "closed", "group", "send", "writer")

    def __init__(self, send: Send, group: Group) -> None:
        self.send = send
        self.group = group
        self.backlog: deque[Message] = deque()
        self.writer: asyncio.Task[None] | None = None
        self.closed = False

    async def finish(self, coroutine: Coroutine[Any, Any, None], waiting_for: Any) -> None:
        """The suspended send (the rest of the pass that was in it), then the backlog in order;
        then back to the fast pass."""
        try:
            while True:
                try:
                    sent = await hand_over(waiting_for)
                except BaseException as exc:  # its failure, or this task's cancellation
                    waiting_for = coroutine.throw(exc)
                else:
                    waiting_for = coroutine.send(sent)
        except StopIteration:
            pass
        except Exception:
            self.group.drop(self)
            return
        finally:
            coroutine.close()
        try:
            backlog = self.backlog
            while backlog:
                await self.send(backlog.popleft())
        except Exception:
            self.group.drop(self)
            return
        self.writer = None
        self.group.resume(self)


class Group:
    """A dream's connections: those whose sends complete at once (`ready`), and those with a
    send in progress (`blocked`, each with its backlog)."""

    __slots__ = ("blocked", "joining", "ready", "subscribed")

    def __init__(self, subscribed: asyncio.Future[None]) -> None:
        self.ready: dict[Connection, Send] = {}
        self.blocked: dict[Connection, None] = {}
        self.joining = 0
        self.subscribed = subscribed

    def __bool__(self) -> bool:
        return bool(self.ready or self.blocked or self.joining)

    def deliver(self, event: Message) -> None:
        ready = self.ready
        if self.blocked:
            behind = []
            for connection in self.blocked:
                if len(connection.backlog) < MAX_PENDING:
                    connection.backlog.append(event)
                else:
                    behind.append(connection)
            for connection in behind:  # not while iterating the dict they leave
                self.drop(connection, close=True)
        if not ready:
            return
        connections = list(ready)
        sends = list(ready.values())
        start, count = 0, len(sends)
        while start < count:
            # [index of the send in progress, whether the pass has been handed to a task]
            state: list[Any] = [start, False]
            driver = _pass(sends, start, event, state)
            try:
                waiting_for = driver.send(None)
            except StopIteration:
                return
            except Exception:
                # This send failed (the client is gone); the pass goes on after it.
                self.drop(connections[state[0]])
                start = state[0] + 1
                continue
            # A send is suspended: its connection leaves the fast pass, and a task finishes that
            # send (the pass, which ends there) and then the connection's backlog.
            connection = connections[state[0]]
            state[1] = True
            del ready[connection]
            self.blocked[connection] = None
            connection.writer = asyncio.get_running_loop().create_task(connection.finish(driver, waiting_for))
            start = state[0] + 1

    def resume(self, connection: Connection) -> None:
        if connection in self.blocked:
            del self.blocked[connection]
            self.ready[connection] = connection.send

    def drop(self, connection: Connection, *, close: bool = False) -> None:
        """Forget a connection whose send failed, or that fell `MAX_PENDING` behind (`close`)."""
        if connection.closed:
            return
        connection.closed = True
        self.ready.pop(connection, None)
        self.blocked.pop(connection, None)
        connection.backlog.clear()
        writer, connection.writer = connection.writer, None
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
        if close:
            asyncio.get_running_loop().create_task(_close(connection.send))


async def _close(send: Send) -> None:
    with contextlib.suppress(Exception):  # gone already: nothing left to close
        await send({"type": "websocket.close", "code": TOO_SLOW})


class Hub(asyncio.Protocol):
    """The process's Redis connection (pub/sub), parsed by hiredis, and the groups it feeds."""

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(encoding="utf-8")
        self.lost: asyncio.Future[None] | None = None

    # -- the Redis side -----------------------------------------------------------------------

    async def start(self, url: str) -> None:
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        self.lost = loop.create_future()
        await loop.create_connection(lambda: self, parts.hostname or "127.0.0.1", parts.port or 6379)

    async def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport has the interface of `asyncio.Transport` without subclassing it.
        self.transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        # Nothing reconnects: a ceiling run with a lost Redis is a failed run, and says so.
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)
        for group in self.groups.values():
            if not group.subscribed.done():
                group.subscribed.set_exception(ConnectionError("the Redis connection was lost"))

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        groups = self.groups
        while (reply := reader.gets()) is not False:
            kind = reply[0]
            if kind == "message":
                group = groups.get(reply[1])
                if group:
                    text = reply[2]
                    if not text.startswith("{"):
                        # `<epoch>:<seq> <json>` from the publish script (the sync producer).
                        text = text.partition(" ")[2]
                    group.deliver({"type": "websocket.send", "text": text})
            elif kind == "subscribe":
                group = groups.get(reply[1])
                if group is not None and not group.subscribed.done():
                    group.subscribed.set_result(None)

    # -- the ASGI side ------------------------------------------------------------------------

    async def join(self, channel: str, send: Send, first_frame: Message) -> Connection:
        """Subscribed (confirmed by Redis) before `first_frame` is sent, and a member right after
        it: every update published once the client has its first frame reaches it."""
        group = self.groups.get(channel)
        if group is None:
            assert self.transport is not None
            group = self.groups[channel] = Group(asyncio.get_running_loop().create_future())
            self.transport.write(resp_command("SUBSCRIBE", channel))
        group.joining += 1
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                await asyncio.shield(group.subscribed)
            await send(first_frame)
        finally:
            group.joining -= 1
        connection = Connection(send, group)
        group.ready[connection] = send
        return connection

    def leave(self, channel: str, connection: Connection | None) -> None:
        group = self.groups.get(channel)
        if group is None:
            return
        if connection is not None:
            group.drop(connection)
        if not group and self.transport is not None and not self.transport.is_closing():
            del self.groups[channel]
            self.transport.write(resp_command("UNSUBSCRIBE", channel))


hub = Hub()


def verify(scope: Scope, secret: str) -> bool:
    for offered in scope.get("subprotocols") or ():
        if offered.startswith(TOKEN_PREFIX):
            token = offered[len(TOKEN_PREFIX) :]
            try:
                jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
            except jwt.InvalidTokenError:
                return False
            return True
    return False


async def websocket(scope: Scope, receive: Receive, send: Send) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    match = PATH.fullmatch(scope["path"])
    if match is None or not verify(scope, os.environ["BENCH_JWT_SECRET"]):
        await send({"type": "websocket.close", "code": 4401})
        return
    dream_id = int(match.group(1))
    channel = channel_name(dream_id)
    await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
    established = json.dumps({"type": "connection_established", "dream_id": dream_id})
    connection: Connection | None = None
    try:
        connection = await hub.join(channel, send, {"type": "websocket.send", "text": established})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text and json.loads(text).get("type") == "ping":
                await send(PONG)
    finally:
        hub.leave(channel, connection)


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


async def http(scope: Scope, send: Send) -> None:
    # Only a readiness probe: the Redis connection is made at startup, so serving means connected.
    found = scope["path"] == "/health"
    body = HEALTH_BODY if found else b""
    await send(
        {
            "type": "http.response.start",
            "status": 200 if found else 404,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    kind = scope["type"]
    if kind == "websocket":
        await websocket(scope, receive, send)
    elif kind == "lifespan":
        await lifespan(receive, send)
    elif kind == "http":
        await http(scope, send)


# -- producers ------------------------------------------------------------------------------


def update_json(dream_id: int, message: str | None) -> str:
    update = {
        "type": "image_update",
        "dream_id": dream_id,
        "status": "processing",
        "images": [],
        "timestamp": time.time(),
        "message": message,
    }
    return json.dumps(update, separators=(",", ":"), ensure_ascii=False)


class CeilingPublisher:
    """Async: PUBLISHes the finished `image_update` JSON, which the reader forwards as is."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def publish(self, dream_id: int, message: str | None) -> None:
        await self.client.publish(channel_name(dream_id), update_json(dream_id, message))

    async def aclose(self) -> None:
        await self.client.aclose()


async def open_ceiling_publisher(redis_url: str) -> CeilingPublisher:
    client = aioredis.Redis.from_url(redis_url)
    await client.ping()
    return CeilingPublisher(client)


class ScriptPublish:
    """Our publish script on a bare sync redis-py client, with the ARGV ours gives it: a new epoch
    (kept only by a group that has none), the ttl in ms, the history size, the channel and the
    message. The cheapest honest way to do the Redis work of one of our publishes."""

    def __init__(self, client: redis.Redis, *, ttl_ms: int = 86_400_000, history_size: int = 100) -> None:
        # Imported here: the server side of the ceiling uses nothing of the package.
        from starlette_dream_ws.groups.backends.redis import _PUBLISH, keys

        self.keys = keys
        self.client = client
        self.ttl_ms = ttl_ms
        self.history_size = history_size
        self.sha = client.script_load(_PUBLISH)
        # A unique epoch per call, as ours offers one, but from a plain counter.
        self.epochs = (f"c{os.getpid()}-{n}" for n in itertools.count())

    def __call__(self, channel: str, text: str) -> Any:
        position_key, stream = self.keys(channel)
        return self.client.evalsha(
            self.sha, 2, position_key, stream, next(self.epochs), self.ttl_ms, self.history_size, channel, text
        )


class SyncCeilingPublisher:
    """Sync: the ceiling's producer for Celery-like code, one blocking call per update."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url, single_connection_client=True)
        self.script = ScriptPublish(self.client)

    def publish(self, dream_id: int, message: str | None) -> None:
        self.script(channel_name(dream_id), update_json(dream_id, message))

    def close(self) -> None:
        self.client.close()
