"""The SSE baseline: sse-starlette's `EventSourceResponse` over one Redis pub/sub connection.

What an integrator would write with the kept SSE library: Starlette, a route per stream, the
JWT checked from the Bearer header, one Redis subscription per dream per process and a bounded
queue per stream, each event sent by sse-starlette (which pings every 30 s here, as our
heartbeat does, and watches for the client going away). Its publisher is the ceiling's: a
plain PUBLISH of the finished update.

    BENCH_REDIS_URL=redis://127.0.0.1:6379 BENCH_JWT_SECRET=... \\
    python -m uvicorn bench.servers.sse_starlette_app:app --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator

import jwt
import redis.asyncio as redis
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SECRET = os.environ["BENCH_JWT_SECRET"]
#: Updates waiting per stream before it is dropped as too slow (ours: `max_pending_events`).
MAX_PENDING = 1000


class Hub:
    """One pub/sub connection; the open streams' queues by channel."""

    def __init__(self) -> None:
        self.client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
        self.pubsub = self.client.pubsub()
        self.streams: dict[str, set[asyncio.Queue[str]]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    async def join(self, channel: str, queue: asyncio.Queue[str]) -> None:
        async with self.lock:
            if channel not in self.streams:
                self.streams[channel] = set()
                await self.pubsub.subscribe(channel)
            self.streams[channel].add(queue)
            if self.reader is None:
                self.reader = asyncio.get_running_loop().create_task(self.read())

    def leave(self, channel: str, queue: asyncio.Queue[str]) -> None:
        self.streams.get(channel, set()).discard(queue)

    async def read(self) -> None:
        while True:
            message = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if message is None:
                continue
            text = message["data"].decode()
            for queue in tuple(self.streams.get(message["channel"].decode(), ())):
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(text)


hub = Hub()


async def events(request: Request) -> Response:
    _, _, token = request.headers.get("authorization", "").partition(" ")
    try:
        jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["sub", "exp"]})
    except jwt.InvalidTokenError:
        return JSONResponse({"type": "error", "code": "unauthenticated"}, status_code=401)
    dream_id = int(request.path_params["dream_id"])
    channel = f"dream_images_{dream_id}"
    queue: asyncio.Queue[str] = asyncio.Queue(MAX_PENDING)
    await hub.join(channel, queue)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        try:
            yield ServerSentEvent(
                json.dumps({"type": "connection_established", "dream_id": dream_id}), event="connection_established"
            )
            while True:
                yield ServerSentEvent(await queue.get(), event="image_update")
        finally:
            hub.leave(channel, queue)

    return EventSourceResponse(stream(), ping=30)


app = Starlette(routes=[Route("/dreams/{dream_id:int}/events", events)])
