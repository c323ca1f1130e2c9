"""The latest message of each group, kept for a while so late joiners can catch up."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from redis import asyncio as aioredis

KEY_PREFIX = "dream_ws:latest:"


def redis_client(url: str) -> aioredis.Redis:
    """A client whose pool waits for a free connection instead of raising when all are busy."""
    from redis import asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=5.0, socket_connect_timeout=5.0)
    return aioredis.Redis(connection_pool=pool)


class StateStore(Protocol):
    async def remember(self, group: str, text: str, ttl: float) -> None: ...

    async def latest(self, group: str) -> str | None: ...

    async def close(self) -> None: ...


class MemoryStateStore:
    """In-process store for `memory://`; entries expire `ttl` seconds after their last write."""

    def __init__(self) -> None:
        # Ordered by last write: with one TTL for all, the oldest entries expire first.
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def remember(self, group: str, text: str, ttl: float) -> None:
        now = time.monotonic()
        self._entries[group] = (now + ttl, text)
        self._entries.move_to_end(group)
        self._purge(now)

    async def latest(self, group: str) -> str | None:
        now = time.monotonic()
        self._purge(now)
        entry = self._entries.get(group)
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def _purge(self, now: float) -> None:
        while self._entries:
            group, (expires_at, _) = next(iter(self._entries.items()))
            if expires_at > now:
                break
            del self._entries[group]

    def __len__(self) -> int:
        return len(self._entries)

    async def close(self) -> None:
        self._entries.clear()


class RedisStateStore:
    """Keeps each group's latest message in a Redis key with an expiry (`SET ... PX`)."""

    def __init__(self, url: str) -> None:
        self._client = redis_client(url)

    async def remember(self, group: str, text: str, ttl: float) -> None:
        await self._client.set(KEY_PREFIX + group, text, px=max(1, int(ttl * 1000)))

    async def latest(self, group: str) -> str | None:
        value = await self._client.get(KEY_PREFIX + group)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def close(self) -> None:
        await self._client.aclose()


def create_state_store(url: str) -> StateStore:
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryStateStore()
    if scheme in ("postgres", "postgresql"):
        from .postgres import PostgresStateStore

        return PostgresStateStore(url)
    return RedisStateStore(url)
