"""A Redis pub/sub backend for broadcaster, without the faults of the one it ships.

broadcaster 0.3.1's Redis backend misses the first subscription with redis-py 8, buffers in an
unbounded queue, and ends silently when Redis goes away. This one reads the pub/sub connection
directly in `next_published`, waits for Redis to confirm each subscription, and raises when the
connection is lost so that the layer can reconnect and subscribe again.
"""

from __future__ import annotations

import asyncio
from typing import Any

from broadcaster import Event
from broadcaster._backends.base import BroadcastBackend
from redis import asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

#: Seconds to wait for Redis to confirm a SUBSCRIBE or UNSUBSCRIBE.
CONFIRM_TIMEOUT = 5.0


class BackendConnectionLost(ConnectionError):
    """The backend connection ended; the layer reconnects."""


class RedisPubSubBackend(BroadcastBackend):
    def __init__(self, url: str) -> None:
        self._url = url
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._pending: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def connect(self) -> None:
        # No silent retries inside redis-py: the layer owns reconnecting, with its own backoff.
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=64,
            timeout=CONFIRM_TIMEOUT,
            socket_connect_timeout=CONFIRM_TIMEOUT,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._pubsub = self._client.pubsub()
        await self._pubsub.connect()
        await self._client.ping()

    async def disconnect(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BackendConnectionLost("backend disconnected"))
        self._pending.clear()
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._client is not None:
            await self._client.aclose()

    async def subscribe(self, channel: str) -> None:
        await self._confirmed("subscribe", channel, self._pubsub.subscribe)

    async def unsubscribe(self, channel: str) -> None:
        await self._confirmed("unsubscribe", channel, self._pubsub.unsubscribe)

    async def _confirmed(self, kind: str, channel: str, command: Any) -> None:
        # Redis answers on the pub/sub connection, which `next_published` reads; wait for it there,
        # so that a publish made after we return is sure to reach us.
        future = asyncio.get_running_loop().create_future()
        self._pending[(kind, channel)] = future
        try:
            await command(channel)
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                await future
        finally:
            self._pending.pop((kind, channel), None)

    async def publish(self, channel: str, message: Any) -> None:
        assert self._client is not None, "connect() first"
        await self._client.publish(channel, message)

    async def next_published(self) -> Event:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                raise BackendConnectionLost(str(exc) or type(exc).__name__) from exc
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else str(channel)
            if kind == "message":
                data = message["data"]
                return Event(channel=channel, message=data.decode() if isinstance(data, bytes) else str(data))
            future = self._pending.get((kind, channel))
            if future is not None and not future.done():
                future.set_result(None)
