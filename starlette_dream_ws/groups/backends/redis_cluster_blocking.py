"""Publishing to `redis+cluster://` from sync code (a Celery task, a thread), no event loop.

The cluster backend's script (`SPUBLISH` to the group's hash-tagged channel) on the primary that
serves the group's slot, then `WAIT` for a replica on the same connection (what the async
backend does per pipeline), from the calling thread: a hop to a background loop per update
would cost several times the Redis work. A lost node, MOVED or a slot move makes the next
attempt read the topology again.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import NoScriptError

from ...protocol import Position, new_epoch
from ...settings import Settings
from ..publishing import PublishMetrics
from .redis import keys
from .redis_cluster_nodes import _SCRIPTS, _SPUBLISH, ClusterURL, pubsub_channel

logger = logging.getLogger("starlette_dream_ws.layer")
_SHA = _SCRIPTS[_SPUBLISH]
_NODE: Any = ClusterNode  # untyped in redis-py


class BlockingRedisClusterPublisher:
    """Publishes on one cluster from any thread of this process (redis-py's cluster client keeps
    a pool per node and is safe to share between threads)."""

    def __init__(self, settings: Settings) -> None:
        self._url = ClusterURL.parse(settings.broadcast_url)
        self._ttl_ms = max(1, int(settings.state_ttl * 1000))
        self._history_size = settings.history_size
        self._timeout = settings.publish_timeout
        self._lock = threading.Lock()
        # redis-py's sync cluster client has no type hints: Any, kept to this class.
        self._client: Any = None
        self._stale = False
        self.pid = os.getpid()
        self.metrics = PublishMetrics()

    def publish(self, channel: str, text: str) -> Position:
        """One attempt: the update's position, or the error (the caller retries)."""
        cluster = self._cluster()
        sharded = pubsub_channel(channel)
        try:
            node = cluster.get_node_from_key(sharded)
            replicas = min(1, len(cluster.nodes_manager.slots_cache.get(cluster.keyslot(sharded), ())) - 1)
            args = (*keys(channel), new_epoch(), self._ttl_ms, self._history_size, sharded, text)
            redis = node.redis_connection
            try:
                epoch, seq, acknowledged = self._run(redis, args, replicas)
            except NoScriptError:
                # A new primary (a failover) or a restart: it has no scripts yet.
                redis.script_load(_SPUBLISH)
                epoch, seq, acknowledged = self._run(redis, args, replicas)
        except Exception:
            self._stale = True  # the next attempt reads the topology again
            raise
        if acknowledged is not None and acknowledged < replicas:
            self._stale = True
            logger.info("redis cluster node %s: no replica confirmed a publish in time", node.name)
        return Position(epoch.decode() if isinstance(epoch, bytes) else str(epoch), int(seq))

    def _run(self, redis: Any, args: tuple[Any, ...], replicas: int) -> tuple[Any, Any, int | None]:
        # One connection for both: WAIT counts the replicas that have this connection's writes.
        pipe = redis.pipeline(transaction=False)
        pipe.evalsha(_SHA, 2, *args)
        wait = replicas > 0 and self._url.replica_wait_ms > 0
        if wait:
            pipe.execute_command("WAIT", replicas, self._url.replica_wait_ms)
        results = pipe.execute(raise_on_error=True)
        epoch, seq = results[0]
        return epoch, seq, int(results[1]) if wait else None

    def _cluster(self) -> Any:
        with self._lock:
            if self._client is None:
                host, port = self._url.nodes[0]
                self._client = RedisCluster(
                    startup_nodes=[_NODE(h, p) for h, p in self._url.nodes],
                    ssl=self._url.tls,
                    socket_timeout=self._timeout,
                    socket_connect_timeout=self._timeout,
                    **_credentials(self._url.node_url(host, port)),
                )
                self._stale = False
            elif self._stale:
                self._client.nodes_manager.initialize()  # raises while no topology is complete
                self._stale = False
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None and os.getpid() == self.pid:
            client.close()


def _credentials(node_url: str) -> dict[str, Any]:
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(node_url)
    found: dict[str, Any] = {}
    if parts.username:
        found["username"] = unquote(parts.username)
    if parts.password:
        found["password"] = unquote(parts.password)
    return found
