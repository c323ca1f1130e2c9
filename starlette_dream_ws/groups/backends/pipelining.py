"""Publishes sent in batches by one writer task: one round trip per batch, not per update.

While one batch is on its way, the next publishes wait and go together, so a burst of updates
(a busy async producer, many endpoints) costs one write and one read per batch; a lone publish
goes at once. Each caller awaits its own future, so what waits is bounded by the publishes in
flight. The Redis and Redis Cluster backends share this; how a batch is sent is theirs.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ...protocol import Position
from ...tasks import cancel_and_wait
from ..contract import BackendConnectionLost

#: A publish waiting to be sent: channel, message, and the caller's future.
Entry = tuple[str, str, "asyncio.Future[Position]"]
#: Most publishes sent in one batch.
MAX_BATCH = 256


def fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class PublishQueue:
    """The publishes of one backend connection and the task that sends them, `send` a batch at
    a time (it settles each entry's future; an error it raises fails what waits)."""

    def __init__(self, send: Callable[[list[Entry]], Awaitable[None]], *, name: str) -> None:
        self._send = send
        self._name = name
        self._waiting: deque[Entry] = deque()
        self._ready = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write(), name=self._name)

    async def stop(self, lost: BaseException) -> None:
        """End the writer; every publish still waiting fails with `lost`."""
        writer, self._writer = self._writer, None
        await cancel_and_wait(writer)
        while self._waiting:
            fail(self._waiting.popleft()[2], lost)

    async def publish(self, channel: str, text: str) -> Position:
        if self._writer is None or self._writer.done():
            raise BackendConnectionLost("not connected")
        future: asyncio.Future[Position] = asyncio.get_running_loop().create_future()
        self._waiting.append((channel, text, future))
        self._ready.set()
        # A caller that gives up (its timeout) cancels the future: the writer skips it if it
        # has not been sent yet; if it has, it may still be published (at least once).
        return await future

    async def _write(self) -> None:
        """Send what waits, a batch at a time, until cancelled."""
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._waiting:
                    batch: list[Entry] = []
                    while self._waiting and len(batch) < MAX_BATCH:
                        entry = self._waiting.popleft()
                        if not entry[2].done():
                            batch.append(entry)
                    if batch:
                        await self._send(batch)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            # Not a backend error (those fail their batch): fail everything waiting, so that no
            # caller waits for a writer that is gone.
            while self._waiting:
                fail(self._waiting.popleft()[2], exc)
            raise
