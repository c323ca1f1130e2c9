"""The Redis Cluster backend for `redis+cluster://host:port,host:port,.../` (and `rediss+cluster://`):
sharded pub/sub, the same positions and history per group as `redis.py`, on every shard.

Keys and channel of a group share one hash tag, `{<group>}`: the position hash, the history
stream and the sharded channel `dream_ws:{<group>}` live in one slot, so the publish script
(`redis.publish_script("SPUBLISH")`, the very logic of `redis://`) runs atomically on one shard,
and a message travels only within that shard. Plain PUBLISH on a cluster reaches every node
instead: the whole cluster's traffic on every node's bus and every subscriber's connection.

Connections: `RedisCluster` (redis-py's asyncio cluster client) discovers the topology (which
primary serves which slot, and its replicas). The backend then keeps, per shard primary:

* one pub/sub connection, opened at `connect()` and read by a task of its own, carrying the
  SSUBSCRIBEs of the groups whose slots that primary serves;
* one small pool for scripts and reads, where each pipeline of publishes ends with
  `WAIT 1 <ms>`, so that a publish returns once the shard's replica has it too (see below).

redis-py's own `ClusterPubSub` (asyncio, from redis-py 8.0.0) is not used: it re-subscribes by
itself after a lost connection or a slot move (what was published meanwhile is silently gone),
reads its shards by polling each in turn with a timeout, and reconciles in tasks of its own.

Following failovers and slot moves: a shard's pub/sub connection that ends (a primary killed),
answers MOVED, or is told SUNSUBSCRIBE by the server (its slot moved away) makes
`next_published` raise `BackendConnectionLost` once everything that arrived before it was
delivered. The layer then builds a new backend, whose `connect()` reads the topology afresh
(and fails until every slot is served again, so the layer retries with backoff), subscribes
every group again on its current primary, and catches each up from its history: nothing
published during the gap is skipped. A publish that fails (MOVED, a dead primary) marks the
topology stale; the next attempt (the layer retries) reads it again first.

Replication is asynchronous: a primary killed after running a publish script but before its
replica copied it would lose an update that had been acknowledged. Each pipeline of publishes
therefore ends with WAIT for one replica (when the shard has one), and a publish returns only
after that; a primary lost before WAIT answered fails the publish, which the layer retries.
WAIT bounds the wait (`replica_wait_ms` in the URL's query, 500 by default, 0 to skip it): a
replica slower than that (or gone, until the cluster notices) costs that time per pipeline, and
the update is then acknowledged with the primary alone holding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ...protocol import Position
from ...tasks import cancel_and_wait
from ..contract import BackendConnectionLost, History, Published, split_position
from .pipelining import PublishQueue
from .pipelining import fail as _fail
from .redis import (
    _POSITION,
    CONFIRM_TIMEOUT,
    _position,
    _published,
    _text,
    history_from,
    keys,
    read_history,
)
from .redis_cluster_nodes import (
    _SPUBLISH,
    PUBSUB_PREFIX,
    TOPOLOGY_ERRORS,
    ClusterNodes,
    ClusterURL,
    pubsub_channel,
)

logger = logging.getLogger("starlette_dream_ws.layer")

#: Messages read from the shards and not yet taken by `next_published`, at most: past it the
#: shard readers stop reading, their sockets fill, and Redis drops a subscriber that stays behind
#: (its output buffer limit), which is then a lost connection like any other.
MAX_INBOX = 4096


class _Shard:
    """The pub/sub connection to one shard primary, and the task reading it."""

    def __init__(self, name: str, connection: AbstractConnection) -> None:
        self.name = name
        # Any: some of redis-py's connection methods (connect, ...) have no annotations.
        self.connection: Any = connection
        self.reader: asyncio.Task[None] | None = None

    async def close(self) -> None:
        await cancel_and_wait(self.reader)
        await self.connection.disconnect()


def _pubsub_connection(url: str) -> AbstractConnection:
    """A lone connection (no pool: nothing else may use it) for one shard's subscriptions."""
    options: dict[str, Any] = dict(parse_url(url))
    connection_class: type[Connection] = options.pop("connection_class", Connection)
    options.pop("db", None)
    return connection_class(
        **options,
        # RESP2: a pub/sub message is a plain array, whatever redis-py's default protocol.
        protocol=2,
        # It waits for messages as long as it takes; keepalive notices a peer gone without a word.
        socket_timeout=None,
        socket_connect_timeout=CONFIRM_TIMEOUT,
        socket_keepalive=True,
        # No silent reconnect (and re-subscribe) inside redis-py: a lost connection is a loss.
        retry=Retry(NoBackoff(), 0),
    )


class RedisClusterBackend:
    """The backend contract on a Redis (or Valkey) Cluster: sharded pub/sub plus one capped,
    expiring stream per group, in the slot of the group's hash tag."""

    def __init__(self, url: str, *, ttl: float = 86400.0, history_size: int = 100) -> None:
        self._url = ClusterURL.parse(url)
        self._nodes = ClusterNodes(self._url)
        self._ttl_ms = max(1, int(ttl * 1000))
        self._history_size = history_size
        self._shards: dict[str, _Shard] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._inbox: asyncio.Queue[Published | BaseException] = asyncio.Queue(MAX_INBOX)
        #: Set once a shard's subscriptions are no longer sure: this backend is done for.
        self._lost: BaseException | None = None
        self._queue = PublishQueue(self._send, name="dream-ws redis cluster publisher")

    # -- life cycle -------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._nodes.connect()
        loop = asyncio.get_running_loop()
        # Every primary at once, so that a dead one fails `connect()` (the layer tries again) rather
        # than the first subscription that lands on it.
        for node in self._nodes.primaries():
            shard = self._shards[node.name] = _Shard(
                node.name, _pubsub_connection(self._url.node_url(node.host, int(node.port)))
            )
            await shard.connection.connect()
            shard.reader = loop.create_task(self._read(shard), name=f"dream-ws redis cluster shard {node.name}")
        self._queue.start()

    async def disconnect(self) -> None:
        lost = BackendConnectionLost("backend disconnected")
        await self._queue.stop(lost)
        if self._lost is None:
            self._lost = lost
        for future in self._pending.values():
            _fail(future, lost)
        self._pending.clear()
        shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            await shard.close()
        await self._nodes.close()

    # -- subscriptions ----------------------------------------------------------------------

    async def subscribe(self, channels: Sequence[str]) -> None:
        """SSUBSCRIBE every channel on its shard; returns once each shard confirmed each."""
        await self._confirmed("ssubscribe", channels)

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        await self._confirmed("sunsubscribe", channels)

    async def _confirmed(self, kind: str, channels: Sequence[str]) -> None:
        if self._lost is not None:
            raise BackendConnectionLost(f"a shard's subscriptions were lost: {self._lost!r}")
        loop = asyncio.get_running_loop()
        by_shard: dict[str, list[str]] = defaultdict(list)
        for channel in channels:
            by_shard[self._nodes.node(channel).name].append(channel)
        futures = []
        for channel in channels:
            future = self._pending[(kind, pubsub_channel(channel))] = loop.create_future()
            futures.append(future)
        try:
            for name, names in by_shard.items():
                shard = self._shards.get(name)
                if shard is None:
                    # The slot moved to a primary this backend has no connection to: the layer
                    # builds a new backend on the current topology.
                    raise self._lose(BackendConnectionLost(f"the cluster changed: no pub/sub connection to {name}"))
                # One command per channel: SSUBSCRIBE takes several channels of one slot only.
                # All of them in one write; the confirmations come back to the shard's reader.
                commands = [(kind.upper(), pubsub_channel(channel)) for channel in names]
                await shard.connection.send_packed_command(shard.connection.pack_commands(commands))
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                for future in futures:
                    await future
        finally:
            for channel in channels:
                self._pending.pop((kind, pubsub_channel(channel)), None)

    async def _read(self, shard: _Shard) -> None:
        """Read one shard's pub/sub connection into the inbox until it fails, then put the
        failure there too, after what arrived before it."""
        try:
            while True:
                reply = await shard.connection.read_response()
                kind = _text(reply[0])
                name = _text(reply[1])
                if kind == "smessage":
                    channel = name[len(PUBSUB_PREFIX) : -1]
                    position, text = split_position(_text(reply[2]))
                    await self._inbox.put(Published(channel, text, position))
                    continue
                future = self._pending.get((kind, name))
                if future is not None and not future.done():
                    future.set_result(None)
                elif kind == "sunsubscribe":
                    # Not asked for: the server dropped it, its slot moved to another shard.
                    raise BackendConnectionLost(f"{shard.name} unsubscribed {name}: its slot moved")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("redis cluster shard %s: pub/sub lost (%s)", shard.name, type(exc).__name__)
            self._lose(exc)

    def _lose(self, exc: BaseException) -> BaseException:
        """Note that subscriptions are no longer sure: fail whatever waits for a confirmation, and
        have `next_published` raise once it has delivered what arrived before."""
        if self._lost is None:
            self._lost = exc
        for future in self._pending.values():
            _fail(future, BackendConnectionLost(str(exc) or type(exc).__name__))
        # Wakes a `next_published` waiting on an empty inbox; a full one is drained first, and
        # `next_published` then finds it empty with `_lost` set.
        with contextlib.suppress(asyncio.QueueFull):
            self._inbox.put_nowait(exc)
        return exc

    async def next_published(self) -> Published:
        if self._lost is not None and self._inbox.empty():
            raise BackendConnectionLost(str(self._lost) or type(self._lost).__name__) from self._lost
        item = await self._inbox.get()
        if isinstance(item, BaseException):
            raise BackendConnectionLost(str(item) or type(item).__name__) from item
        return item

    # -- publishing -------------------------------------------------------------------------

    async def publish(self, channel: str, text: str) -> Position:
        return await self._queue.publish(channel, text)

    async def _send(self, batch: list[tuple[str, str, asyncio.Future[Position]]]) -> None:
        try:
            await self._nodes.refresh_if_stale()
            by_node: dict[str, list[tuple[str, str, asyncio.Future[Position]]]] = defaultdict(list)
            for entry in batch:
                by_node[self._nodes.node(entry[0]).name].append(entry)
        except Exception as exc:
            for _, _, future in batch:
                _fail(future, exc)
            return
        # The shards' pipelines side by side; each fails only its own publishes.
        try:
            async with asyncio.TaskGroup() as group:
                for name, entries in by_node.items():
                    group.create_task(self._send_to(name, entries))
        except BaseException:
            # Cancelled (`disconnect()`): no caller may wait for an answer that will not come;
            # the layer retries them on the next connection.
            lost = BackendConnectionLost("backend disconnected")
            for _, _, future in batch:
                _fail(future, lost)
            raise

    async def _send_to(self, name: str, entries: list[tuple[str, str, asyncio.Future[Position]]]) -> None:
        calls = [
            (_SPUBLISH, channel, (self._ttl_ms, self._history_size, pubsub_channel(channel), text))
            for channel, text, _ in entries
        ]
        replicas = min(1, min(self._nodes.replicas(channel) for channel, _, _ in entries))
        try:
            results = await self._nodes.scripts(name, calls, wait_replicas=replicas)
        except Exception as exc:
            self._nodes.mark_stale(exc)
            for _, _, future in entries:
                _fail(future, exc)
            return
        for (_, _, future), result in zip(entries, results, strict=True):
            if isinstance(result, Exception):
                self._nodes.mark_stale(result)
                _fail(future, result)
            elif not future.done():
                future.set_result(_position(result))

    # -- history ----------------------------------------------------------------------------

    async def history(self, channel: str, after: Position | None) -> History:
        """The current position and the kept messages after `after`, in one round trip and one
        transaction (the group's keys are in one slot, on one node)."""
        _, client = await self._nodes.on_node(channel)
        try:
            async with client.pipeline(transaction=True) as pipe:
                read_history(pipe, channel, after, self._history_size)
                history = history_from(channel, after, await pipe.execute())
        except TOPOLOGY_ERRORS:
            self._nodes.mark_stale()
            raise
        # None: no history at all: start one, as `positions` would.
        return history or History((await self.positions([channel]))[0], [])

    async def positions(self, channels: Sequence[str]) -> list[Position]:
        """Each channel's current position: one pipeline per shard, side by side."""
        await self._nodes.refresh_if_stale()
        by_node: dict[str, list[int]] = defaultdict(list)
        for i, channel in enumerate(channels):
            by_node[self._nodes.node(channel).name].append(i)
        results: list[Any] = [None] * len(channels)

        async def on(name: str, indexes: list[int]) -> None:
            calls = [(_POSITION, channels[i], (self._ttl_ms,)) for i in indexes]
            try:
                replies = await self._nodes.scripts(name, calls)
            except Exception as exc:
                replies = [exc] * len(indexes)
            for i, reply in zip(indexes, replies, strict=True):
                results[i] = reply

        async with asyncio.TaskGroup() as group:
            for name, indexes in by_node.items():
                group.create_task(on(name, indexes))
        for result in results:
            if isinstance(result, Exception):
                self._nodes.mark_stale(result)
                raise result
        return [_position(result) for result in results]

    async def latest(self, channel: str) -> Published | None:
        """The newest message of `channel` (its latest state), if any is kept."""
        _, client = await self._nodes.on_node(channel)
        position_key, stream = keys(channel)
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hget(position_key, "epoch")
                pipe.xrevrange(stream, count=1)
                epoch, entries = await pipe.execute()
        except TOPOLOGY_ERRORS:
            self._nodes.mark_stale()
            raise
        if epoch is None or not entries:
            return None
        return _published(channel, _text(epoch), entries[0])
