"""Groups: one backend connection and one subscription per group per process, with our own
fan-out to the local members of each group.

broadcaster's `Broadcast` gives each subscriber an unbounded queue and races when two
subscribe to a new channel at once, so the layer does it itself: members are plain objects
with a non-blocking `deliver(event)`, every published message is decoded once per process,
and a lost backend connection is re-established by the reader task (`recovery.py`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..protocol import Position, encode
from ..settings import Settings
from ..tasks import cancel_and_wait, quietly
from .backends import create_backend
from .contract import Backend, BackendFactory, Published
from .events import GroupEvent
from .membership import Group, Member, decode
from .publishing import BackendUnavailable, PublishError, PublishMetrics, retrying
from .recovery import reconnect, resubscribe
from .subscriptions import Change, Subscriber

logger = logging.getLogger("starlette_dream_ws.layer")

#: Replayed events kept decoded (shared by the members that replay them), at most.
MAX_REPLAYED = 1024

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Replay:
    """A group's messages after a position, for a member that resumes."""

    current: Position
    events: list[GroupEvent]
    #: Whether `events` are every message after the position asked for: nothing was lost.
    complete: bool


class GroupLayer:
    """Publish to and listen on named groups, shared by every connection of one app.

    Bound to the event loop it first connects on. `connect()` is lazy and idempotent, so an
    app that is mounted (whose lifespan Starlette never runs) connects on first use.
    """

    def __init__(self, settings: Settings, backend_factory: BackendFactory | None = None) -> None:
        self.settings = settings
        self._factory = backend_factory
        self.backend: Backend | None = None
        self.groups: dict[str, Group] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        #: How many times the backend connection was re-established.
        self.reconnects = 0
        self.publish_metrics = PublishMetrics()
        #: Events replayed lately, decoded once for every member that replays them.
        self._recent: collections.OrderedDict[tuple[str, Position], GroupEvent] = collections.OrderedDict()
        self._reader: asyncio.Task[None] | None = None
        self._resubscriber: asyncio.Task[None] | None = None
        self._subscriber: Subscriber | None = None
        self._lock: asyncio.Lock | None = None
        self._healthy: asyncio.Event | None = None

    # -- life cycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._reader is not None and not self._reader.done()

    @property
    def healthy(self) -> bool:
        return self.connected and self._healthy is not None and self._healthy.is_set()

    @property
    def lock(self) -> asyncio.Lock:
        """Held while the backend connection is replaced or subscriptions are made on it."""
        assert self._lock is not None, "connect() first"
        return self._lock

    def build_backend(self) -> Backend:
        url = self.settings.broadcast_url
        if self._factory is not None:
            return self._factory(url)
        return create_backend(url, ttl=self.settings.state_ttl, history_size=self.settings.history_size)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            if self.loop is not None and not self.loop.is_closed() and self.loop.is_running():
                raise RuntimeError("this layer is connected on another running event loop")
            self._reset(loop)
        if self.connected:
            return
        async with self.lock:
            if self.connected:
                return
            if self.backend is not None:
                # The reader ended unexpectedly; its backend is of no further use.
                await quietly(self.backend.disconnect())
                self.backend = None
            try:
                backend = self.build_backend()
            except Exception as exc:
                raise BackendUnavailable(f"cannot build the groups backend: {type(exc).__name__}") from exc
            try:
                await backend.connect()
            except Exception as exc:
                await quietly(backend.disconnect())
                raise BackendUnavailable(f"cannot connect to the groups backend: {type(exc).__name__}") from exc
            self.backend = backend
            self._reader = loop.create_task(self._listen(), name="dream-ws layer reader")
            assert self._subscriber is not None
            self._subscriber.start()
            if self.groups:
                # Members of groups left from a reader that ended must be subscribed again.
                self._resubscriber = loop.create_task(resubscribe(self), name="dream-ws layer resubscribe")
            else:
                self.reconnected(count=False)

    def _reset(self, loop: asyncio.AbstractEventLoop) -> None:
        # A new loop (tests, a restarted server): state of the old loop cannot be reused.
        self.loop = loop
        self.backend = None
        self._reader = self._resubscriber = None
        self._subscriber = Subscriber(self)
        self.groups = {}
        self._lock = asyncio.Lock()
        self._healthy = asyncio.Event()

    def reconnected(self, *, count: bool = True) -> None:
        """The connection is usable again, every group subscribed (called by `resubscribe`)."""
        if count:
            self.reconnects += 1
        assert self._healthy is not None
        self._healthy.set()

    async def disconnect(self) -> None:
        """Stop listening and close the backend; members are dropped."""
        reader, self._reader = self._reader, None
        await cancel_and_wait(reader)
        if self._subscriber is not None:
            await self._subscriber.close(BackendUnavailable("the groups layer was disconnected"))
        self.groups.clear()
        if self._healthy is not None:
            self._healthy.clear()
        backend, self.backend = self.backend, None
        if backend is not None:
            await quietly(backend.disconnect())

    # -- groups -----------------------------------------------------------------------------

    def position(self, group: str) -> Position | None:
        """The position of the newest event of `group` this process knows (None: not joined)."""
        entry = self.groups.get(group)
        return entry.position if entry is not None else None

    def local_members(self, group: str) -> int:
        entry = self.groups.get(group)
        return len(entry.members) if entry is not None else 0

    async def join(self, name: str, member: Member) -> None:
        """Add `member` to group `name`; once this returns, every later publish reaches it.

        Raises `BackendUnavailable` if the group cannot be subscribed now.
        """
        await self.connect()
        group = self.groups.get(name)
        if group is None:
            await self.wait_healthy()
            group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = Group()
            assert self._subscriber is not None
            self._subscriber.change(Change.SUBSCRIBE, name, group)
        group.members.add(member)
        if group.ready.is_set() and group.error is None:
            return
        try:
            await group.ready.wait()
        except BaseException:
            # The subscriber drops (or unsubscribes) a group nobody is waiting for any more.
            group.members.discard(member)
            raise
        if group.error is not None:
            group.members.discard(member)
            raise BackendUnavailable(f"cannot subscribe to {name}: {type(group.error).__name__}") from group.error
        if member not in group.members:
            # Left while subscribing.
            self.unsubscribe_if_empty(name, group)

    async def leave(self, name: str, member: Member) -> None:
        group = self.groups.get(name)
        if group is None or member not in group.members:
            return
        group.members.discard(member)
        if group.ready.is_set():
            self.unsubscribe_if_empty(name, group)

    def unsubscribe_if_empty(self, name: str, group: Group) -> None:
        if group.members or self.groups.get(name) is not group:
            return
        del self.groups[name]
        if self.healthy and self._subscriber is not None:  # else the reconnect will not subscribe it again
            self._subscriber.change(Change.UNSUBSCRIBE, name, group)

    # -- publishing -------------------------------------------------------------------------

    async def publish(self, group: str, message: dict[str, Any]) -> Position:
        """Send `message` to every member of `group` in every process, retrying with backoff;
        returns the position the backend gave it.

        The backend also keeps it in the group's history (its latest state for `latest()`).
        Raises `PublishError` once every retry has failed.
        """
        text = encode(message)

        async def attempt() -> Position:
            await self.connect()
            await self.wait_healthy()
            backend = self.backend
            if backend is None:
                raise BackendUnavailable("the groups backend is reconnecting")
            return await backend.publish(group, text)

        metrics = self.publish_metrics
        started = time.perf_counter()
        try:
            position = await retrying(attempt, self.settings, metrics, what=f"publish to {group}")
        except PublishError:
            metrics.failed(group)
            raise
        metrics.published += 1
        metrics.seconds.observe(time.perf_counter() - started)
        return position

    async def latest(self, group: str) -> GroupEvent | None:
        """The group's latest published message, with its position; None if it has none."""
        published = await self._read(lambda backend: backend.latest(group))
        return None if published is None else decode(published)

    async def replay(self, group: str, after: Position) -> Replay:
        """What a member that has seen `after` missed: the kept messages after it, oldest first."""
        history = await self._read(lambda backend: backend.history(group, after))
        events = [event for event in map(self._replayed, history.messages) if event is not None]
        return Replay(history.current, events, history.complete_after(after))

    def _replayed(self, published: Published) -> GroupEvent | None:
        """`published` decoded, once per process for all the members that replay it (after a
        restart, every client of a dream resumes from about the same place)."""
        if published.position is None:
            return decode(published)
        key = (published.channel, published.position)
        event = self._recent.get(key)
        if event is None:
            event = decode(published)
            if event is None:
                return None
            self._recent[key] = event
            if len(self._recent) > MAX_REPLAYED:
                self._recent.popitem(last=False)
        return event

    async def _read(self, read: Callable[[Backend], Awaitable[T]]) -> T:
        async def attempt() -> T:
            await self.connect()
            backend = self.backend
            if backend is None:
                raise BackendUnavailable("the groups backend is reconnecting")
            return await read(backend)

        async with asyncio.timeout(self.settings.publish_timeout):
            return await attempt()

    # -- the reader -------------------------------------------------------------------------

    async def wait_healthy(self) -> None:
        assert self._healthy is not None
        if self._healthy.is_set():
            return
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                await self._healthy.wait()
        except TimeoutError:
            raise BackendUnavailable("the groups backend is reconnecting") from None

    async def _listen(self) -> None:
        try:
            while True:
                backend = self.backend
                assert backend is not None
                try:
                    published = await backend.next_published()
                except Exception as exc:
                    logger.warning("groups backend connection lost (%s); reconnecting", type(exc).__name__)
                    await self._recover()
                    continue
                group = self.groups.get(published.channel)
                if group is not None:
                    group.receive(published)
        finally:
            await cancel_and_wait(self._resubscriber)
            self._resubscriber = None

    async def _recover(self) -> None:
        assert self._healthy is not None and self.loop is not None
        self._healthy.clear()
        await cancel_and_wait(self._resubscriber)
        await reconnect(self)
        # Subscribing again waits for confirmations that only this reader can read, so it runs
        # beside the reader rather than in it.
        self._resubscriber = self.loop.create_task(resubscribe(self), name="dream-ws layer resubscribe")
