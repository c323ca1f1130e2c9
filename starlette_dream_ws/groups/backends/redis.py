"""The Redis backend for `redis://` and `rediss://`: pub/sub for speed, a short stream per group
so that nothing is missed.

broadcaster 0.3.1's Redis backend misses the first subscription with redis-py 8, buffers in an
unbounded queue, and ends silently when Redis goes away. This one reads the pub/sub connection
directly in `next_published`, waits for Redis to confirm each subscription, and raises when the
connection is lost so that the layer can reconnect and subscribe again.

Pub/sub delivers at most once: what is published while a subscriber is reconnecting is gone.
So each publish also appends the message to the group's stream (`XADD`, capped and expiring)
in the same atomic script, and the channel carries the entry's id, which is the message's
position. After a reconnect the layer reads the stream from the last position it delivered
(`history`), and the newest entry is the group's latest state (`latest`).

Publishes are pipelined: while one batch is on its way to Redis, the next ones wait and go
together in one round trip, so a burst of updates (a busy async producer, many endpoints)
costs one write and one read per batch rather than per update. A lone publish goes at once.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis import asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ...tasks import cancel_and_wait
from ..contract import BackendConnectionLost, Position, Published, split_position

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
_PUBLISH_SHA = hashlib.sha1(_PUBLISH.encode()).hexdigest()
#: Most publishes sent in one pipeline.
MAX_BATCH = 256


def stream_position(stream_id: str) -> Position:
    """A stream id (`<ms>-<seq>`) as a position; `ValueError` if it is not one."""
    ms, sep, seq = stream_id.partition("-")
    if not sep:
        raise ValueError(stream_id)
    return int(ms), int(seq)


def stream_id(position: Position) -> str:
    return "-".join(map(str, position))


def redis_client(url: str, **options: Any) -> aioredis.Redis:
    """A client whose pool waits for a free connection instead of raising when all are busy."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=64, timeout=CONFIRM_TIMEOUT, socket_connect_timeout=CONFIRM_TIMEOUT, **options
    )
    return aioredis.Redis(connection_pool=pool)


class RedisBackend:
    """The backend contract on Redis pub/sub plus one capped, expiring stream per group."""

    def __init__(self, url: str, *, ttl: float = 86400.0, history_size: int = 100) -> None:
        self._url = url
        self._ttl_ms = max(1, int(ttl * 1000))
        self._history_size = history_size
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._pending: dict[tuple[str, str], asyncio.Future[None]] = {}
        # Publishes waiting for the writer; each has a caller awaiting it, so this holds at
        # most as many entries as there are publishes in flight.
        self._outbox: deque[tuple[str, str, asyncio.Future[None]]] = deque()
        self._outbox_ready = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        # No silent retries inside redis-py: the layer owns reconnecting, with its own backoff.
        self._client = redis_client(self._url, socket_keepalive=True, retry=Retry(NoBackoff(), 0))
        self._pubsub = self._client.pubsub()
        await self._pubsub.connect()
        await self._client.ping()
        self._writer = asyncio.get_running_loop().create_task(self._write(), name="dream-ws redis publisher")

    async def disconnect(self) -> None:
        writer, self._writer = self._writer, None
        await cancel_and_wait(writer)
        lost = BackendConnectionLost("backend disconnected")
        for future in self._pending.values():
            _fail(future, lost)
        self._pending.clear()
        while self._outbox:
            _fail(self._outbox.popleft()[2], lost)
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._client is not None:
            await self._client.aclose()

    async def subscribe(self, channels: Sequence[str]) -> None:
        """Subscribe to every channel with one command; returns once Redis has confirmed each."""
        await self._confirmed("subscribe", channels, self._pubsub.subscribe)

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        await self._confirmed("unsubscribe", channels, self._pubsub.unsubscribe)

    async def _confirmed(self, kind: str, channels: Sequence[str], command: Any) -> None:
        # Redis answers on the pub/sub connection, which `next_published` reads; wait for it there,
        # so that a publish made after we return is sure to reach us.
        loop = asyncio.get_running_loop()
        futures = []
        for channel in channels:
            future = self._pending[(kind, channel)] = loop.create_future()
            futures.append(future)
        try:
            await command(*channels)
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                for future in futures:
                    await future
        finally:
            for channel in channels:
                self._pending.pop((kind, channel), None)

    async def publish(self, channel: str, text: str) -> None:
        if self._writer is None or self._writer.done():
            raise BackendConnectionLost("not connected")
        future = asyncio.get_running_loop().create_future()
        self._outbox.append((channel, text, future))
        self._outbox_ready.set()
        # A caller that gives up (its timeout) cancels the future: the writer skips it if it
        # has not been sent yet; if it has, it may still be published (at least once).
        await future

    async def _write(self) -> None:
        """Send what waits in the outbox, a pipeline at a time, until cancelled."""
        try:
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
                while self._outbox:
                    batch: list[tuple[str, str, asyncio.Future[None]]] = []
                    while self._outbox and len(batch) < MAX_BATCH:
                        entry = self._outbox.popleft()
                        if not entry[2].done():
                            batch.append(entry)
                    if batch:
                        await self._send(batch)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # Not a Redis error (those fail their batch): fail everything waiting, so that no
            # caller waits for a writer that is gone.
            while self._outbox:
                _fail(self._outbox.popleft()[2], exc)
            raise

    async def _send(self, batch: list[tuple[str, str, asyncio.Future[None]]]) -> None:
        assert self._client is not None
        try:
            results = await self._pipeline(batch)
            unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if unknown:
                # Redis lost its script cache (a restart, SCRIPT FLUSH): load it, send those again.
                await self._client.script_load(_PUBLISH)
                for i, result in zip(unknown, await self._pipeline([batch[i] for i in unknown]), strict=True):
                    results[i] = result
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else BackendConnectionLost("backend disconnected")
            for _, _, future in batch:
                _fail(future, failure)
            if failure is not exc:
                raise
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                _fail(future, result)
            elif not future.done():
                future.set_result(None)

    async def _pipeline(self, batch: list[tuple[str, str, asyncio.Future[None]]]) -> list[Any]:
        assert self._client is not None
        async with self._client.pipeline(transaction=False) as pipe:
            for channel, message, _ in batch:
                pipe.evalsha(
                    _PUBLISH_SHA, 1, HISTORY_PREFIX + channel, message, self._ttl_ms, self._history_size, channel
                )
            return list(await pipe.execute(raise_on_error=False))

    async def next_published(self) -> Published:
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
                position, text = split_position(_text(message["data"]), stream_position)
                return Published(channel, text, position)
            future = self._pending.get((kind, channel))
            if future is not None and not future.done():
                future.set_result(None)

    # -- history ----------------------------------------------------------------------------

    async def history(self, channel: str, after: Position | None) -> list[Published]:
        """Messages of `channel` later than `after`, oldest first."""
        assert self._client is not None
        start = f"({stream_id(after)}" if after is not None else "-"
        entries = await self._client.xrange(HISTORY_PREFIX + channel, min=start, count=self._history_size)
        return [
            Published(channel, _text(fields[b"m"]), stream_position(_text(entry_id)))
            for entry_id, fields in entries or ()
            if fields is not None
        ]

    async def last_positions(self, channels: Sequence[str]) -> list[Position | None]:
        """The position of each channel's newest message, in one round trip."""
        assert self._client is not None
        async with self._client.pipeline(transaction=False) as pipe:
            for channel in channels:
                pipe.xrevrange(HISTORY_PREFIX + channel, count=1)
            results = await pipe.execute()
        return [stream_position(_text(entries[0][0])) if entries else None for entries in results]

    async def latest(self, channel: str) -> str | None:
        """The newest message of `channel` (its latest state), if any is kept."""
        assert self._client is not None
        entries = await self._client.xrevrange(HISTORY_PREFIX + channel, count=1)
        if not entries or entries[0][1] is None:
            return None
        return _text(entries[0][1][b"m"])


def _fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
