"""Subscribing and unsubscribing in batches, in the order they were asked for, by one task.

A burst of connections to different groups then costs a few round trips to the backend, not
two each, and a group left and joined again is unsubscribed, then subscribed, whatever the timing.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from ..tasks import cancel_and_wait
from .contract import Backend
from .membership import Group
from .publishing import BackendUnavailable

if TYPE_CHECKING:
    from .layer import GroupLayer

logger = logging.getLogger("starlette_dream_ws.layer")

#: Most groups subscribed (or unsubscribed) with one command.
MAX_BATCH = 500


class Change(enum.Enum):
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"


class Subscriber:
    """Owns the queue of subscription changes of one layer and the task that makes them."""

    def __init__(self, layer: GroupLayer) -> None:
        self._layer = layer
        self._changes: list[tuple[Change, str, Group]] = []
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the task (again, if it ended); it runs until `close()`."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dream-ws layer subscriber")

    def change(self, kind: Change, name: str, group: Group) -> None:
        self._changes.append((kind, name, group))
        self._wanted.set()
        self.start()

    async def close(self, error: BaseException) -> None:
        """Stop, failing the joins that still wait with `error`."""
        await cancel_and_wait(self._task)
        self._task = None
        fail(self._layer, [(name, group) for kind, name, group in self._changes if kind is Change.SUBSCRIBE], error)
        self._changes = []

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while self._changes:
                kind = self._changes[0][0]
                count = 1
                while count < min(len(self._changes), MAX_BATCH) and self._changes[count][0] is kind:
                    count += 1
                taken = [(name, group) for _, name, group in self._changes[:count]]
                del self._changes[:count]
                if kind is Change.SUBSCRIBE:
                    await self._subscribe(taken)
                else:
                    await self._unsubscribe([name for name, _ in taken])

    async def _subscribe(self, taken: list[tuple[str, Group]]) -> None:
        layer = self._layer
        batch = []
        for name, group in taken:
            if layer.groups.get(name) is not group:
                continue
            if not group.members:  # all left before their turn: no subscription
                del layer.groups[name]
                group.ready.set()
                continue
            batch.append((name, group))
        if not batch:
            return
        try:
            await layer.wait_healthy()
            async with layer.lock:
                backend = layer.backend
                if backend is None:
                    raise BackendUnavailable("the groups backend is reconnecting")
                await subscribe_with_baselines(backend, batch)
        except asyncio.CancelledError:
            fail(layer, batch, BackendUnavailable("the groups layer was disconnected"))
            raise
        except Exception as exc:
            fail(layer, batch, exc)
            return
        for name, group in batch:
            group.ready.set()
            if not group.members:  # all left while subscribing
                layer.unsubscribe_if_empty(name, group)

    async def _unsubscribe(self, names: list[str]) -> None:
        layer = self._layer
        async with layer.lock:
            backend = layer.backend
            if backend is None or not layer.healthy:
                return  # the reconnect subscribes only the groups that have members
            try:
                await in_batches(backend.unsubscribe, names)
            except Exception as exc:
                logger.warning("unsubscribing from %d groups failed: %s", len(names), type(exc).__name__)


async def subscribe_with_baselines(backend: Backend, batch: Sequence[tuple[str, Group]]) -> None:
    """Subscribe, then note where each group's history stands: a catch-up after a later
    reconnect starts there, never earlier (members joined now want nothing older)."""
    names = [name for name, _ in batch]
    await backend.subscribe(names)
    for (_, group), position in zip(batch, await backend.positions(names), strict=True):
        group.advance(position)


async def in_batches(operation: Callable[[Sequence[str]], Awaitable[None]], names: Sequence[str]) -> None:
    for start in range(0, len(names), MAX_BATCH):
        await operation(names[start : start + MAX_BATCH])


def fail(layer: GroupLayer, batch: Sequence[tuple[str, Group]], error: BaseException) -> None:
    """End these joins with `error` (each joiner raises `BackendUnavailable`)."""
    for name, group in batch:
        group.error = error
        if layer.groups.get(name) is group:
            del layer.groups[name]
        group.ready.set()
