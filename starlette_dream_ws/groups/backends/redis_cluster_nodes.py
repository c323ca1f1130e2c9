"""A Redis Cluster's topology as one process knows it, and a client per node for scripts and reads.

`redis_cluster.py` (the backend) and its sync publisher share the names here: the sharded
channel of a group, the scripts, the URL, and which errors say the topology changed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from redis import asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AskError, ClusterDownError, MovedError, NoScriptError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...protocol import new_epoch
from .redis import _POSITION, CONFIRM_TIMEOUT, KEY_PREFIX, keys, publish_script, redis_client

logger = logging.getLogger("starlette_dream_ws.layer")

SCHEMES = ("redis+cluster", "rediss+cluster")
_SPUBLISH = publish_script("SPUBLISH")
_SCRIPTS = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_SPUBLISH, _POSITION)}
#: Milliseconds a pipeline of publishes waits for the shard's replica to confirm it (WAIT).
REPLICA_WAIT_MS = 500
#: Errors that say the topology changed: the next operation reads it again first.
TOPOLOGY_ERRORS = (
    MovedError,
    AskError,
    ClusterDownError,
    TryAgainError,
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
)


def pubsub_channel(channel: str) -> str:
    """The sharded channel of a group: its keys' hash tag, hence their slot."""
    return f"{KEY_PREFIX}{{{channel}}}"


PUBSUB_PREFIX = pubsub_channel("")[:-1]


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterURL:
    """A `redis+cluster://` URL: its seed nodes, and a `redis://` URL for each node."""

    nodes: tuple[tuple[str, int], ...]
    tls: bool
    userinfo: str
    query: str
    replica_wait_ms: int

    @classmethod
    def parse(cls, url: str) -> ClusterURL:
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"a Redis Cluster URL starts with one of {SCHEMES}")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        nodes = []
        for entry in hosts.split(","):
            host, sep, port = entry.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"each node of a Redis Cluster URL is host:port, got {entry!r}")
            nodes.append((host.strip("[]"), int(port)))
        if parts.path not in ("", "/", "/0"):
            raise ValueError("a Redis Cluster has only database 0")
        options = parse_qsl(parts.query)
        wait = [int(value) for name, value in options if name == "replica_wait_ms"]
        query = urlencode([(name, value) for name, value in options if name != "replica_wait_ms"])
        return cls(
            tuple(nodes), parts.scheme == "rediss+cluster", userinfo, query, wait[-1] if wait else REPLICA_WAIT_MS
        )

    def node_url(self, host: str, port: int) -> str:
        """A plain `redis://` (or `rediss://`) URL of one node, with the credentials and options."""
        scheme = "rediss" if self.tls else "redis"
        auth = f"{self.userinfo}@" if self.userinfo else ""
        address = f"[{host}]" if ":" in host else host
        return f"{scheme}://{auth}{address}:{port}/0" + (f"?{self.query}" if self.query else "")


class ClusterNodes:
    """Which primary serves which slot (read again after an error that says it changed), and a
    small pool per node, made on first use."""

    def __init__(self, url: ClusterURL) -> None:
        self.url = url
        self.cluster: RedisCluster | None = None
        #: Clients for scripts and reads, one per node name (`host:port`).
        self._clients: dict[str, aioredis.Redis] = {}
        self.stale = False
        self._refreshing = asyncio.Lock()

    async def connect(self) -> None:
        first, *others = self.url.nodes
        # No silent retries inside redis-py: the layer owns reconnecting, with its own backoff.
        # Every slot must be served: during a failover, connecting fails until a replica took over.
        self.cluster = RedisCluster.from_url(
            self.url.node_url(*first),
            startup_nodes=[ClusterNode(host, port) for host, port in others],
            require_full_coverage=True,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=CONFIRM_TIMEOUT,
        )
        await self.cluster.initialize()

    def primaries(self) -> list[ClusterNode]:
        assert self.cluster is not None, "connect() first"
        return list(self.cluster.get_primaries())

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            await cluster.aclose()

    def mark_stale(self, error: BaseException | None = None) -> None:
        """Read the topology again before the next operation (after `error`, if it says so)."""
        if error is None or isinstance(error, TOPOLOGY_ERRORS):
            self.stale = True

    async def scripts(
        self, name: str, calls: Sequence[tuple[str, str, tuple[Any, ...]]], *, wait_replicas: int = 0
    ) -> list[Any]:
        """Run `(script, channel, extra args)` calls on node `name` in one pipeline; each gets the
        group's keys and a new epoch first. A script the node lacks (a new primary, a restart) is
        loaded and run again, without a retry of the others."""
        results = await self.pipeline(name, calls, wait_replicas)
        unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if unknown:
            client = self.client(name)
            for script in {calls[i][0] for i in unknown}:
                await client.script_load(script)
            retried = await self.pipeline(name, [calls[i] for i in unknown], wait_replicas)
            for i, result in zip(unknown, retried, strict=True):
                results[i] = result
        return results

    async def pipeline(
        self, name: str, calls: Sequence[tuple[str, str, tuple[Any, ...]]], wait_replicas: int
    ) -> list[Any]:
        async with self.client(name).pipeline(transaction=False) as pipe:
            for script, channel, args in calls:
                pipe.evalsha(_SCRIPTS[script], 2, *keys(channel), new_epoch(), *args)
            wait = wait_replicas > 0 and self.url.replica_wait_ms > 0
            if wait:
                # On this connection, after the scripts: it waits for what they wrote.
                pipe.execute_command("WAIT", wait_replicas, self.url.replica_wait_ms)
            results = list(await pipe.execute(raise_on_error=False))
        if wait:
            acknowledged = results.pop()
            if isinstance(acknowledged, Exception):
                raise acknowledged
            if int(acknowledged) < wait_replicas:
                # A replica that did not answer in time: the topology may say it is gone by now.
                self.stale = True
                logger.info("redis cluster node %s: no replica confirmed a publish in time", name)
        return results

    def node(self, channel: str) -> ClusterNode:
        """The primary serving `channel`'s slot, as this process knows the topology."""
        assert self.cluster is not None, "connect() first"
        node = self.cluster.get_node_from_key(pubsub_channel(channel))
        if node is None:
            raise SlotNotCoveredError(f"no primary serves the slot of {channel}")
        return node

    def replicas(self, channel: str) -> int:
        assert self.cluster is not None, "connect() first"
        slot = self.cluster.keyslot(pubsub_channel(channel))
        return max(0, len(self.cluster.nodes_manager.slots_cache.get(slot, ())) - 1)

    def client(self, name: str) -> aioredis.Redis:
        client = self._clients.get(name)
        if client is None:
            host, _, port = name.rpartition(":")
            client = self._clients[name] = redis_client(
                self.url.node_url(host, int(port)), socket_keepalive=True, retry=Retry(NoBackoff(), 0)
            )
        return client

    async def refresh_if_stale(self) -> None:
        """Read the topology again after an error that says it changed (one refresh at a time)."""
        if not self.stale:
            return
        async with self._refreshing:
            if self.stale:
                assert self.cluster is not None
                await self.cluster.nodes_manager.initialize()
                self.stale = False

    async def on_node(self, channel: str) -> tuple[str, aioredis.Redis]:
        await self.refresh_if_stale()
        name = self.node(channel).name
        return name, self.client(name)
