"""The backend contract: everything the groups layer asks of a backend, and nothing more.

A backend is one connection (or a few) to a broker, owned by one `GroupLayer` on one event
loop. It publishes text to channels, delivers what is published to the channels it is
subscribed to, and keeps each channel's recent history.

Every message a backend accepts gets a *position* (`protocol.Position`), assigned atomically
with the publish so that every process sees the same one: `seq` counts the channel's messages
from 1, within one unbroken history named `epoch`. A backend starts a new epoch (and `seq`
from 1) whenever it has lost a channel's history: expired, or a broker restarted empty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ..protocol import Position

if TYPE_CHECKING:
    from .publishing import PublishMetrics


class BackendConnectionLost(ConnectionError):
    """The backend's connection ended (or fell behind); the layer reconnects and catches up."""


class Published(NamedTuple):
    """One message as a backend delivers it: live, or read back from history (a named tuple:
    one is made for every message a process receives)."""

    channel: str
    text: str
    #: None for a message put on the channel by someone else, without history.
    position: Position | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class History:
    """A channel's current position and the kept messages after a given one, oldest first."""

    current: Position
    messages: Sequence[Published]

    def complete_after(self, position: Position) -> bool:
        """Whether `messages` are every message after `position`: nothing was lost in between."""
        if position.epoch != self.current.epoch or position.seq > self.current.seq:
            return False
        if not self.messages:
            return position.seq == self.current.seq
        first = self.messages[0].position
        return first is not None and first.seq == position.seq + 1


class Backend(Protocol):
    """What `GroupLayer` calls. Methods may raise any exception for a failed operation; the
    layer retries publishes, and treats a failed read as a lost connection."""

    async def connect(self) -> None:
        """Open the connections; after a failure, `disconnect()` is called."""

    async def disconnect(self) -> None:
        """Close everything, failing whatever still waits; safe to call more than once."""

    async def subscribe(self, channels: Sequence[str]) -> None:
        """Subscribe to all `channels`; once this returns, every later publish reaches us."""

    async def unsubscribe(self, channels: Sequence[str]) -> None: ...

    async def publish(self, channel: str, text: str) -> Position:
        """Give `text` the channel's next position, keep it in the channel's history and deliver
        it to every subscriber, all at once; returns the position."""

    async def next_published(self) -> Published:
        """The next message on a subscribed channel; raises `BackendConnectionLost` when the
        connection is gone (after delivering what arrived before)."""

    async def history(self, channel: str, after: Position | None) -> History:
        """The channel's current position, and its kept messages later than `after` (all of
        them when `after` is None or of another epoch), oldest first."""

    async def positions(self, channels: Sequence[str]) -> Sequence[Position]:
        """Each channel's current position (`seq` 0 and a new epoch for a channel that has
        none yet: a client can resume from it)."""

    async def latest(self, channel: str) -> Published | None:
        """The newest kept message of `channel`: the group's latest state."""


#: Builds a backend for a URL (the layer builds a new one after each lost connection).
BackendFactory = Callable[[str], Backend]


def split_position(data: str) -> tuple[Position | None, str]:
    """A live message as brokers that carry no metadata deliver it, `"<epoch>:<seq> <text>"`;
    a message without a position (published by someone else) comes back whole, with None."""
    head, sep, rest = data.partition(" ")
    if sep and ":" in head:
        try:
            return Position.parse(head), rest
        except ValueError:
            pass
    return None, data


class BlockingPublisher(Protocol):
    """Publishing from sync code without an event loop, where a backend has a sync client.

    `publish` is one attempt (the caller retries); connections are per thread and per process.
    """

    pid: int
    metrics: PublishMetrics

    def publish(self, channel: str, text: str) -> Position: ...

    def close(self) -> None: ...
