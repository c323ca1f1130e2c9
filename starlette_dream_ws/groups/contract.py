"""The backend contract: everything the groups layer asks of a backend, and nothing more.

A backend is one connection (or a few) to a broker, owned by one `GroupLayer` on one event
loop. It publishes text to channels, delivers what is published to the channels it is
subscribed to, and keeps each channel's recent history, so that a layer that lost its
connection can deliver what it missed, and the newest message is the channel's latest state.

Every message a backend delivers carries its *position* in its channel's history. Positions
are the backend's business; the layer only compares two positions of the same channel
(`later > earlier`), so each backend may encode them as it likes, as tuples of integers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Protocol

#: A message's place in its channel's history: ordered within one channel, opaque otherwise.
Position = tuple[int, ...]


class BackendConnectionLost(ConnectionError):
    """The backend's connection ended (or fell behind); the layer reconnects and catches up."""


@dataclasses.dataclass(frozen=True, slots=True)
class Published:
    """One message as a backend delivers it: live, or read back from history."""

    channel: str
    text: str
    #: None for a message put on the channel by someone else, without history.
    position: Position | None = None


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

    async def publish(self, channel: str, text: str) -> None:
        """Append `text` to the channel's history and deliver it to every subscriber, atomically."""

    async def next_published(self) -> Published:
        """The next message on a subscribed channel; raises `BackendConnectionLost` when the
        connection is gone (after delivering what arrived before)."""

    async def history(self, channel: str, after: Position | None) -> Sequence[Published]:
        """The kept messages of `channel` later than `after` (all of them for None), oldest first."""

    async def last_positions(self, channels: Sequence[str]) -> Sequence[Position | None]:
        """The position of each channel's newest kept message (None where nothing is kept)."""

    async def latest(self, channel: str) -> str | None:
        """The newest kept message of `channel`: the group's latest state."""


#: Builds a backend for a URL (the layer builds a new one after each lost connection).
BackendFactory = Callable[[str], Backend]


def split_position(data: str, parse: Callable[[str], Position]) -> tuple[Position | None, str]:
    """A live message as brokers that carry no metadata deliver it, `"<position> <text>"`,
    split with the backend's own `parse`; a message without a position (published by
    someone else) comes back whole, with None."""
    head, sep, rest = data.partition(" ")
    if sep and head[:1].isdigit():
        try:
            return parse(head), rest
        except ValueError:
            pass
    return None, data
