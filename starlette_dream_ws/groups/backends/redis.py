"""The Redis backend for `redis://` and `rediss://`: pub/sub for speed, a short stream per group
so that nothing is missed.

broadcaster 0.3.1's Redis backend misses the first subscription with redis-py 8, buffers in an
unbounded queue, and ends silently when Redis goes away. This one reads the pub/sub connection
directly in `next_published`, waits for Redis to confirm each subscription, and raises when the
connection is lost so that the layer can reconnect and subscribe again.

Pub/sub delivers at most once: what is published while a subscriber is reconnecting is gone.
So one script per publish gives the message the group's next position (a hash of epoch and
seq), appends it to the group's stream (`XADD`, capped and expiring, the entry id `<seq>-0`)
and publishes `<epoch>:<seq> <message>`. After a reconnect the layer reads the stream after the
last position it delivered (`history`), and the newest entry is the group's latest state.
A Redis restarted empty has no position hash: the next publish starts a new epoch.

Publishes are pipelined (`pipelining.PublishQueue`): a burst of updates costs one round trip
per batch rather than per update.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from redis import asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ...protocol import Position, new_epoch
from ..contract import BackendConnectionLost, History, Published, split_position
from .pipelining import PublishQueue
from .pipelining import fail as _fail

#: Seconds to wait for Redis to confirm a SUBSCRIBE or UNSUBSCRIBE.
CONFIRM_TIMEOUT = 5.0
KEY_PREFIX = "dream_ws:"

# Each group's keys share a hash tag (`{<group>}`), so that on a cluster one script can update
# them together. KEYS: the position hash (epoch, seq) and the history stream.
_ENSURE_EPOCH = """
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  -- A new history: whatever the stream still holds belongs to a lost one.
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
"""


def publish_script(command: str) -> str:
    """The publish script, delivering with `command`: PUBLISH here, SPUBLISH on a cluster
    (`redis_cluster.py`, sharded pub/sub), so that both backends keep positions the same way.

    Give the message the group's next position, append it to the capped, expiring stream (whose
    entry id is "<seq>-0"), and publish "<epoch>:<seq> <message>". ARGV: a new epoch (used only
    if the group has none), ttl ms, stream length, channel, message.
    """
    return (
        _ENSURE_EPOCH
        + """
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local epoch = redis.call('HGET', KEYS[1], 'epoch')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'm', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('"""
        + command
        + """', ARGV[4], epoch .. ':' .. seq .. ' ' .. ARGV[5])
return {epoch, seq}
"""
    )


_PUBLISH = publish_script("PUBLISH")
# The group's current position, starting an epoch if it has none. ARGV: a new epoch, ttl ms.
_POSITION = (
    _ENSURE_EPOCH
    + """
return {redis.call('HGET', KEYS[1], 'epoch'), tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')}
"""
)
_SCRIPTS = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_PUBLISH, _POSITION)}
_PUBLISH_SHA = _SCRIPTS[_PUBLISH]


def keys(channel: str) -> tuple[str, str]:
    """The position hash and the history stream of a group."""
    tag = "{" + channel + "}"
    return f"{KEY_PREFIX}{tag}:position", f"{KEY_PREFIX}{tag}:history"


def _position(reply: Any) -> Position:
    epoch, seq = reply
    return Position(_text(epoch), int(seq))


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
        self._queue = PublishQueue(self._send, name="dream-ws redis publisher")

    async def connect(self) -> None:
        # No silent retries inside redis-py: the layer owns reconnecting, with its own backoff.
        self._client = redis_client(self._url, socket_keepalive=True, retry=Retry(NoBackoff(), 0))
        self._pubsub = self._client.pubsub()
        await self._pubsub.connect()
        await self._client.ping()
        self._queue.start()

    async def disconnect(self) -> None:
        lost = BackendConnectionLost("backend disconnected")
        await self._queue.stop(lost)
        for future in self._pending.values():
            _fail(future, lost)
        self._pending.clear()
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

    async def publish(self, channel: str, text: str) -> Position:
        return await self._queue.publish(channel, text)

    async def _send(self, batch: list[tuple[str, str, asyncio.Future[Position]]]) -> None:
        calls = [(_PUBLISH, channel, (self._ttl_ms, self._history_size, channel, text)) for channel, text, _ in batch]
        try:
            results = await self._scripts(calls)
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
                future.set_result(_position(result))

    async def _scripts(self, calls: Sequence[tuple[str, str, tuple[Any, ...]]]) -> list[Any]:
        """Run `(script, channel, extra args)` calls in one pipeline; each gets the group's keys
        and a new epoch first. A script Redis lost (a restart, SCRIPT FLUSH) is loaded and run
        again, without a retry of the others."""
        results = await self._pipeline(calls)
        unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if unknown:
            assert self._client is not None
            for script in {calls[i][0] for i in unknown}:
                await self._client.script_load(script)
            for i, result in zip(unknown, await self._pipeline([calls[i] for i in unknown]), strict=True):
                results[i] = result
        return results

    async def _pipeline(self, calls: Sequence[tuple[str, str, tuple[Any, ...]]]) -> list[Any]:
        assert self._client is not None
        async with self._client.pipeline(transaction=False) as pipe:
            for script, channel, args in calls:
                pipe.evalsha(_SCRIPTS[script], 2, *keys(channel), new_epoch(), *args)
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
                position, text = split_position(_text(message["data"]))
                return Published(channel, text, position)
            future = self._pending.get((kind, channel))
            if future is not None and not future.done():
                future.set_result(None)

    # -- history ----------------------------------------------------------------------------

    async def history(self, channel: str, after: Position | None) -> History:
        """The current position and the kept messages after `after`, in one round trip (and one
        transaction: no publish comes between the position and the messages)."""
        assert self._client is not None
        async with self._client.pipeline(transaction=True) as pipe:
            read_history(pipe, channel, after, self._history_size)
            history = history_from(channel, after, await pipe.execute())
        # None: no history at all: start one, as `positions` would.
        return history or History((await self.positions([channel]))[0], [])

    async def positions(self, channels: Sequence[str]) -> list[Position]:
        """Each channel's current position, in one round trip."""
        results = await self._scripts([(_POSITION, channel, (self._ttl_ms,)) for channel in channels])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return [_position(result) for result in results]

    async def latest(self, channel: str) -> Published | None:
        """The newest message of `channel` (its latest state), if any is kept."""
        assert self._client is not None
        position_key, stream = keys(channel)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hget(position_key, "epoch")
            pipe.xrevrange(stream, count=1)
            epoch, entries = await pipe.execute()
        if epoch is None or not entries:
            return None
        return _published(channel, _text(epoch), entries[0])


def read_history(pipe: Any, channel: str, after: Position | None, size: int) -> None:
    """Queue in `pipe` (a transaction: no publish comes between them) the reads of a group's
    position and of its kept messages, all of them and those after `after`."""
    position_key, stream = keys(channel)
    pipe.hmget(position_key, "epoch", "seq")
    pipe.xrange(stream, count=size)
    if after is not None:
        pipe.xrange(stream, min=f"({after.seq}-0", count=size)


def history_from(channel: str, after: Position | None, replies: Sequence[Any]) -> History | None:
    """The `History` the replies of `read_history` give; None if the group has no position."""
    (epoch, seq), entries = replies[0], replies[-1]
    if epoch is None:
        return None
    current = Position(_text(epoch), int(seq or 0))
    if after is None or after.epoch != current.epoch:
        entries = replies[1]
    return History(current, [_published(channel, current.epoch, entry) for entry in entries or ()])


def _published(channel: str, epoch: str, entry: Any) -> Published:
    entry_id, fields = entry
    seq = int(_text(entry_id).partition("-")[0])
    return Published(channel, _text(fields[b"m"]), Position(epoch, seq))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
