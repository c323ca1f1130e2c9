"""Publishing to `redis://` from sync code (a Celery task, a thread, a script) without an event loop.

The async backend's publish runs on a loop; reaching it from sync code means a hop to a
background thread and back for every update, which costs a Celery worker several times the CPU
of the Redis call itself. This runs the very same script (`redis._PUBLISH`: the group's next
position, the capped stream, the PUBLISH) on a sync client of the calling thread, so an update
costs about one round trip. Each thread has its own connection (no lock shared between a
worker's threads, `per_thread.PerThread`).
"""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ...protocol import Position, new_epoch
from ...settings import Settings
from ..publishing import PublishMetrics
from .per_thread import PerThread
from .redis import _PUBLISH, _PUBLISH_SHA, keys


class BlockingRedisPublisher:
    """Publishes on one Redis URL from any thread of this process; `close()` ends every connection."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.broadcast_url
        self._ttl_ms = max(1, int(settings.state_ttl * 1000))
        self._history_size = settings.history_size
        self._timeout = settings.publish_timeout
        self._clients: PerThread[redis.Redis] = PerThread(self._connect, lambda client: client.close())
        self.pid = self._clients.pid
        self.metrics = PublishMetrics()

    def publish(self, channel: str, text: str) -> Position:
        """One attempt: the update's position, or the Redis error (the caller retries)."""
        client = self._clients.get()
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
            self._clients.drop(client)
            raise
        epoch, seq = reply
        return Position(epoch.decode() if isinstance(epoch, bytes) else str(epoch), int(seq))

    def _connect(self) -> redis.Redis:
        # No retries inside redis-py: the producer's own policy (backoff, PublishError) decides.
        return redis.Redis.from_url(
            self._url,
            single_connection_client=True,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )

    def close(self) -> None:
        """Close the connections of every thread (in the process that made them)."""
        self._clients.close_all()
