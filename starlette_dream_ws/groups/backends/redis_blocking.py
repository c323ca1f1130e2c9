"""Publishing to `redis://` from sync code (a Celery task, a thread, a script) without an event loop.

The async backend's publish runs on a loop; reaching it from sync code means a hop to a
background thread and back for every update, which costs a Celery worker several times the CPU
of the Redis call itself. This runs the very same script (`redis._PUBLISH`: the group's next
position, the capped stream, the PUBLISH) on a sync client of the calling thread, so an update
costs about one round trip. Each thread has its own connection (no lock shared between a
worker's threads), made again in a forked child (Celery's prefork pool).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ...protocol import Position, new_epoch
from ...settings import Settings
from ..publishing import PublishMetrics
from .redis import _PUBLISH, _PUBLISH_SHA, keys


class BlockingRedisPublisher:
    """Publishes on one Redis URL from any thread of this process; `close()` ends every connection."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.broadcast_url
        self._ttl_ms = max(1, int(settings.state_ttl * 1000))
        self._history_size = settings.history_size
        self._timeout = settings.publish_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        #: Every client made in this process, to close them all (threads may be gone by then).
        self._clients: list[redis.Redis] = []
        self.pid = os.getpid()
        self.metrics = PublishMetrics()

    def publish(self, channel: str, text: str) -> Position:
        """One attempt: the update's position, or the Redis error (the caller retries)."""
        client = self._client()
        position_key, stream = keys(channel)
        args = (position_key, stream, new_epoch(), self._ttl_ms, self._history_size, channel, text)
        try:
            try:
                reply = client.evalsha(_PUBLISH_SHA, 2, *args)
            except NoScriptError:
                # A Redis restarted (or SCRIPT FLUSH): load it once, then it is cached again.
                client.script_load(_PUBLISH)
                reply = client.evalsha(_PUBLISH_SHA, 2, *args)
        except Exception:
            # The connection may be half-used (a timeout mid-reply): the next attempt makes a new one.
            self._drop(client)
            raise
        epoch, seq = reply
        return Position(epoch.decode() if isinstance(epoch, bytes) else str(epoch), int(seq))

    def _client(self) -> redis.Redis:
        client: redis.Redis | None = getattr(self._local, "client", None)
        if client is not None:
            return client
        # No retries inside redis-py: the producer's own policy (backoff, PublishError) decides.
        client = redis.Redis.from_url(
            self._url,
            single_connection_client=True,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )
        self._local.client = client
        with self._lock:
            self._clients.append(client)
        return client

    def _drop(self, client: Any) -> None:
        self._local.client = None
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        client.close()

    def close(self) -> None:
        """Close the connections of every thread (in the process that made them)."""
        with self._lock:
            clients, self._clients = self._clients, []
        self._local = threading.local()
        if os.getpid() != self.pid:
            return  # a forked child's copies: closing them is the parent's business
        for client in clients:
            client.close()
