"""The Redis backend: pub/sub for speed, a short stream per group so nothing is missed.

broadcaster 0.3.1's Redis backend misses the first subscription with redis-py 8, buffers in an
unbounded queue, and ends silently when Redis goes away. This one reads the pub/sub connection
directly in `next_published`, waits for Redis to confirm each subscription, and raises when the
connection is lost so that the layer can reconnect and subscribe again.

Pub/sub delivers at most once: what is published while a subscriber is reconnecting is gone.
So each publish also appends the message to the group's stream (`XADD`, capped and expiring)
in the same atomic script, and the channel carries the entry's id. After a reconnect the layer
reads the stream from the last id it delivered (`history`), and the newest entry is the group's
latest state (`latest`).
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
HISTORY_PREFIX = "dream_ws:history:"

# Append to the group's stream, keep it short and expiring, and publish "<id> <message>".
_PUBLISH = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'm', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], id .. ' ' .. ARGV[1])
return id
"""


class BackendConnectionLost(ConnectionError):
    """The backend connection ended; the layer reconnects."""


class HistoryEvent(Event):
    """A published message with its position in the group's history (a stream id)."""

    def __init__(self, channel: str, message: str, id: str | None) -> None:
        super().__init__(channel, message)
        self.id = id


def stream_id(value: str) -> tuple[int, int]:
    """Stream ids (`<ms>-<seq>`) as comparable numbers."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


class RedisPubSubBackend(BroadcastBackend):
    def __init__(self, url: str, *, ttl: float = 86400.0, history_size: int = 100) -> None:
        self._url = url
        self._ttl_ms = max(1, int(ttl * 1000))
        self._history_size = history_size
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._script: Any = None
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
        self._script = self._client.register_script(_PUBLISH)
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
        assert self._script is not None, "connect() first"
        await self._script(keys=[HISTORY_PREFIX + channel], args=[message, self._ttl_ms, self._history_size, channel])

    async def next_published(self) -> Event:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                raise BackendConnectionLost(str(exc) or type(exc).__name__) from exc
            if message is None:
                continue
            kind = message["type"]
            channel = _text(message["channel"])
            if kind == "message":
                return _event(channel, _text(message["data"]))
            future = self._pending.get((kind, channel))
            if future is not None and not future.done():
                future.set_result(None)

    # -- history ----------------------------------------------------------------------------

    async def history(self, channel: str, after: str | None) -> list[HistoryEvent]:
        """Messages of `channel` newer than the stream id `after`, oldest first."""
        assert self._client is not None
        entries = await self._client.xrange(
            HISTORY_PREFIX + channel, min=f"({after}" if after else "-", count=self._history_size
        )
        return [
            HistoryEvent(channel, _text(fields[b"m"]), _text(entry_id))
            for entry_id, fields in entries or ()
            if fields is not None
        ]

    async def last_id(self, channel: str) -> str | None:
        """The id of the newest message of `channel`, if any is kept."""
        assert self._client is not None
        entries = await self._client.xrevrange(HISTORY_PREFIX + channel, count=1)
        return _text(entries[0][0]) if entries else None

    async def latest(self, channel: str) -> str | None:
        """The newest message of `channel` (its latest state), if any is kept."""
        assert self._client is not None
        entries = await self._client.xrevrange(HISTORY_PREFIX + channel, count=1)
        if not entries or entries[0][1] is None:
            return None
        return _text(entries[0][1][b"m"])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _event(channel: str, data: str) -> HistoryEvent:
    # "<stream id> <message>" from our publish; a plain message from anyone else.
    head, sep, rest = data.partition(" ")
    if sep and head[:1].isdigit() and "-" in head:
        return HistoryEvent(channel, rest, head)
    return HistoryEvent(channel, data, None)
