"""The in-process backend for `memory://`: one process, any number of layers, loops and threads.

Every connected backend of one URL in the process shares a hub that keeps each channel's
recent history with positions, so the memory backend keeps the same promises as Redis and
PostgreSQL (catch-up, latest state, expiry) within one process, for as long as any backend of
that URL is connected (the last one to disconnect takes the hub with it, as a broker restarted
empty). Delivery to a backend on another event loop goes through that loop's `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import Sequence

from ...protocol import Position, new_epoch
from ..contract import BackendConnectionLost, History, Published

#: Messages waiting for a reader that is behind; past it the connection counts as lost, as
#: Redis drops a subscriber whose output buffer overflows (the layer then catches up).
MAX_PENDING = 10_000


class _Channel:
    __slots__ = ("epoch", "expires_at", "history", "seq")

    def __init__(self, size: int) -> None:
        self.history: collections.deque[Published] = collections.deque(maxlen=size)
        self.epoch = new_epoch()
        self.seq = 0
        self.expires_at = 0.0

    @property
    def position(self) -> Position:
        return Position(self.epoch, self.seq)


class _Hub:
    """The channels and subscribers of one `memory://` URL in this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.channels: dict[str, _Channel] = {}
        self.subscribers: dict[str, set[MemoryBackend]] = {}
        #: Connected backends: the hub lives while there is one.
        self.connected = 0

    def touch(self, channel: str, entry: _Channel, now: float) -> None:
        """Mark `entry` written now; channels are kept in order of their last write, so with one
        TTL for all, expired ones are at the front and are dropped here, a few at a time."""
        self.channels.pop(channel, None)
        self.channels[channel] = entry
        for name in list(itertools.islice(self.channels, 8)):
            if self.channels[name].expires_at > now:
                break
            del self.channels[name]

    def alive(self, channel: str, now: float) -> _Channel | None:
        entry = self.channels.get(channel)
        if entry is not None and entry.expires_at <= now:
            del self.channels[channel]
            return None
        return entry

    def channel(self, name: str, now: float, size: int, ttl: float) -> _Channel:
        """The channel's entry, made (with a new epoch) if it has none or it expired."""
        entry = self.alive(name, now)
        if entry is None:
            entry = _Channel(size)
            entry.expires_at = now + ttl
            self.touch(name, entry, now)
        return entry


_hubs: dict[str, _Hub] = {}
_hubs_lock = threading.Lock()


def _attach(url: str) -> _Hub:
    with _hubs_lock:
        hub = _hubs.get(url)
        if hub is None:
            hub = _hubs[url] = _Hub()
        hub.connected += 1
        return hub


def _detach(url: str, hub: _Hub) -> None:
    with _hubs_lock:
        hub.connected -= 1
        if hub.connected <= 0 and _hubs.get(url) is hub:
            del _hubs[url]


class MemoryBackend:
    """The backend contract on a process-wide hub (positions: a counter per channel)."""

    def __init__(self, url: str, *, ttl: float = 86400.0, history_size: int = 100) -> None:
        self._url = url
        self._hub: _Hub | None = None
        self._ttl = ttl
        self._history_size = history_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[Published] = collections.deque()
        self._arrived = asyncio.Event()
        self._lost: BackendConnectionLost | None = None
        self._channels: set[str] = set()

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._hub = _attach(self._url)

    async def disconnect(self) -> None:
        hub, self._hub = self._hub, None
        if hub is not None:
            with hub.lock:
                for channel in self._channels:
                    members = hub.subscribers.get(channel)
                    if members is not None:
                        members.discard(self)
                        if not members:
                            del hub.subscribers[channel]
            _detach(self._url, hub)
        self._channels.clear()
        self._lose("the backend was disconnected")

    def _connected(self) -> _Hub:
        if self._hub is None:
            raise BackendConnectionLost("not connected")
        return self._hub

    async def subscribe(self, channels: Sequence[str]) -> None:
        hub = self._connected()
        with hub.lock:
            for channel in channels:
                hub.subscribers.setdefault(channel, set()).add(self)
                self._channels.add(channel)

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        hub = self._connected()
        with hub.lock:
            for channel in channels:
                members = hub.subscribers.get(channel)
                if members is not None:
                    members.discard(self)
                    if not members:
                        del hub.subscribers[channel]
                self._channels.discard(channel)

    async def publish(self, channel: str, text: str) -> Position:
        hub = self._connected()
        now = time.monotonic()
        with hub.lock:
            entry = hub.channel(channel, now, self._history_size, self._ttl)
            entry.seq += 1
            published = Published(channel, text, entry.position)
            entry.history.append(published)
            entry.expires_at = now + self._ttl
            hub.touch(channel, entry, now)
            # Under the lock: every subscriber gets a channel's messages in position order.
            for receiver in hub.subscribers.get(channel, ()):
                receiver._post(published)
        assert published.position is not None
        return published.position

    def _post(self, published: Published) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._arrive(published)
        else:
            loop.call_soon_threadsafe(self._arrive, published)

    def _arrive(self, published: Published) -> None:
        if self._lost is not None:
            return
        if len(self._queue) >= MAX_PENDING:
            self._lose(f"more than {MAX_PENDING} messages waiting: the reader fell behind")
            return
        self._queue.append(published)
        self._arrived.set()

    def _lose(self, reason: str) -> None:
        if self._lost is None:
            self._lost = BackendConnectionLost(reason)
        self._arrived.set()

    async def next_published(self) -> Published:
        while not self._queue:
            if self._lost is not None:
                raise self._lost
            self._arrived.clear()
            await self._arrived.wait()
        return self._queue.popleft()

    async def history(self, channel: str, after: Position | None) -> History:
        hub = self._connected()
        with hub.lock:
            entry = hub.channel(channel, time.monotonic(), self._history_size, self._ttl)
            current, kept = entry.position, list(entry.history)
        if after is not None and after.epoch == current.epoch:
            kept = [item for item in kept if item.position is not None and item.position.seq > after.seq]
        return History(current, kept)

    async def positions(self, channels: Sequence[str]) -> list[Position]:
        now = time.monotonic()
        hub = self._connected()
        with hub.lock:
            return [hub.channel(channel, now, self._history_size, self._ttl).position for channel in channels]

    async def latest(self, channel: str) -> Published | None:
        hub = self._connected()
        with hub.lock:
            entry = hub.alive(channel, time.monotonic())
            return entry.history[-1] if entry is not None and entry.history else None
