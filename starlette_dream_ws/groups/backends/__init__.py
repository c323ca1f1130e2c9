"""The one place that maps a broadcast URL's scheme to a backend (one backend per file here).

Each backend is imported only when its scheme is used, so a process on Redis never imports
asyncpg, and one on `memory://` imports neither client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..contract import Backend, BlockingPublisher

if TYPE_CHECKING:
    from ...settings import Settings

#: Schemes with a backend that is tested here against a real server, reconnects after a lost
#: connection and catches up on what it missed (memory is one process: nothing to lose).
SCHEMES = ("memory", "redis", "rediss", "redis+cluster", "rediss+cluster", "postgres", "postgresql")
#: broadcaster's other schemes, and why they are refused rather than half-working.
REFUSED_SCHEMES = {
    "redis-stream": (
        "broadcaster's Redis stream backend polls one message per round trip, raises nothing useful "
        "when Redis goes away and skips what was published meanwhile; use redis://, which keeps a "
        "stream per group itself"
    ),
    "kafka": (
        "broadcaster's Kafka backend is not tested here (no Kafka server to test against) and neither "
        "detects a lost connection nor catches up on what was published meanwhile"
    ),
}


def unsupported(url: str) -> str | None:
    """Why `url` cannot be a broadcast URL, or None if it can."""
    scheme = urlsplit(url).scheme
    if scheme in REFUSED_SCHEMES:
        return f"broadcast_url scheme {scheme!r} is not supported: {REFUSED_SCHEMES[scheme]}"
    if scheme not in SCHEMES:
        return f"broadcast_url scheme {scheme!r} is not supported; use one of {sorted(SCHEMES)}"
    return None


def is_process_local(url: str) -> bool:
    """Whether the backend of `url` reaches only this process (`memory://`)."""
    return urlsplit(url).scheme == "memory"


def create_backend(url: str, *, ttl: float = 86400.0, history_size: int = 100) -> Backend:
    """The backend for `url`, keeping each group's history `ttl` seconds, at most `history_size`."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from .memory import MemoryBackend

        return MemoryBackend(url, ttl=ttl, history_size=history_size)
    if scheme in ("redis", "rediss"):
        from .redis import RedisBackend

        return RedisBackend(url, ttl=ttl, history_size=history_size)
    if scheme in ("redis+cluster", "rediss+cluster"):
        from .redis_cluster import RedisClusterBackend

        return RedisClusterBackend(url, ttl=ttl, history_size=history_size)
    if scheme in ("postgres", "postgresql"):
        from .postgres import PostgresBackend

        return PostgresBackend(url, ttl=ttl, history_size=history_size)
    raise ValueError(unsupported(url) or f"no backend for {url!r}")


def create_blocking_publisher(settings: Settings) -> BlockingPublisher | None:
    """The sync publisher for `settings.broadcast_url` (publishing without an event loop), or
    None if its backend has none (then sync producers go through a background loop)."""
    scheme = urlsplit(settings.broadcast_url).scheme
    if scheme in ("redis", "rediss"):
        from .redis_blocking import BlockingRedisPublisher

        return BlockingRedisPublisher(settings)
    if scheme in ("redis+cluster", "rediss+cluster"):
        from .redis_cluster_blocking import BlockingRedisClusterPublisher

        return BlockingRedisClusterPublisher(settings)
    if scheme in ("postgres", "postgresql"):
        try:
            from .postgres_blocking import BlockingPostgresPublisher
        except ImportError:  # no psycopg: the async driver on the background loop does it
            return None
        return BlockingPostgresPublisher(settings)
    return None
