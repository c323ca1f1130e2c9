"""Heartbeat and expiry: one timer for all connections of an app, and the policy it applies.

A sleeping task per connection costs memory and wake-ups; instead one task ticks a few times
per interval and asks each connection whether a ping or a timeout is due (`overdue`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from ..protocol import CloseCodes
from ..settings import Settings
from ..tasks import cancel_and_wait
from .connection import CloseConnection

logger = logging.getLogger("starlette_dream_ws.heartbeat")


class Beating(Protocol):
    def heartbeat(self, now: float) -> None:
        """Send a ping or close for silence if one is due at monotonic time `now`."""


class Heartbeat:
    """Ticks while at least one connection is registered, and stops when none is left."""

    def __init__(self, interval: float, timeout: float, members: set[Any] | None = None) -> None:
        """`members`: a set to keep the members in, if the owner keeps one of them anyway."""
        # A tenth of the shortest period keeps pings and timeouts within 10% of their due time.
        self.tick = max(0.02, min(interval, timeout - interval) / 10)
        self._members: set[Beating] = set() if members is None else members
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: Beating) -> None:
        self._members.add(member)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dream-ws heartbeat")

    def discard(self, member: Beating) -> None:
        self._members.discard(member)
        if not self._members and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while self._members:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            for member in tuple(self._members):
                try:
                    member.heartbeat(now)
                except Exception:
                    logger.exception("heartbeat check failed")

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)


def overdue(last_seen: float, expires_at: float | None, now: float, settings: Settings) -> CloseConnection | None:
    """Why a connection must close now: silence past `heartbeat_timeout` (4408), or a token past
    its expiry (4401); None while it may stay."""
    if now - last_seen >= settings.effective_heartbeat_timeout:
        return CloseConnection(CloseCodes.HEARTBEAT_TIMEOUT, "heartbeat_timeout", "no message in time")
    if expires_at is not None and time.time() >= expires_at + settings.jwt_leeway:
        return CloseConnection(CloseCodes.UNAUTHENTICATED, "token_expired", "the token has expired")
    return None
