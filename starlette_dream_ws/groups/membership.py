"""Each group's local members, where its delivery stands, and the fan-out to them."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

from ..protocol import Position, with_position
from .contract import History, Published
from .events import GroupEvent

logger = logging.getLogger("starlette_dream_ws.layer")

#: Live events held for one group while its missed events are read after a reconnect.
MAX_BACKLOG = 10_000


class Member(Protocol):
    def deliver(self, event: dict[str, Any]) -> None:
        """Take one event without blocking (buffer it, or drop the member if it cannot keep up)."""


class Group:
    """One group in one process: its members, its subscription, its last delivered position."""

    __slots__ = ("backlog", "error", "members", "position", "ready")

    def __init__(self) -> None:
        self.members: set[Member] = set()
        #: Set once subscribing has ended, with `error` set if it failed.
        self.ready = asyncio.Event()
        self.error: BaseException | None = None
        #: Position of the newest event delivered: a catch-up reads what comes after it.
        self.position: Position | None = None
        #: Live events that arrived while catching up; None when not catching up.
        self.backlog: list[Published] | None = None

    def advance(self, position: Position | None) -> None:
        """Note `position` as delivered (an older one is ignored: positions only move forward)."""
        if position is not None and position.follows(self.position):
            self.position = position

    def receive(self, published: Published) -> bool:
        """Deliver a message to every member unless it is held or already delivered; whether it was."""
        position = published.position
        if position is not None:
            if self.backlog is not None:
                if len(self.backlog) < MAX_BACKLOG:
                    self.backlog.append(published)
                else:
                    logger.error("backlog of %s is full while catching up; dropped an event", published.channel)
                return False
            if not position.follows(self.position):
                return False  # already delivered by a catch-up
            self.position = position
        event = decode(published)
        if event is None:
            return False
        # A copy: deliver() may start sending at once, and a handler may leave the group.
        for member in tuple(self.members):
            try:
                member.deliver(event)
            except Exception:
                logger.exception("delivering to a member of %s failed", published.channel)
        return True

    def catch_up(self, history: History) -> int:
        """Deliver what was missed, then what was held meanwhile, in order; how many were new.

        Where the history is of another epoch than what was delivered (the backend lost it),
        its messages are all new, and the group goes on from its current position.
        """
        held, self.backlog = self.backlog or [], None
        delivered = sum(self.receive(published) for published in [*history.messages, *held])
        self.advance(history.current)
        return delivered


def decode(published: Published) -> GroupEvent | None:
    """The event members get, with its `seq` and `epoch`: decoded once for all of them; None
    (logged) for junk."""
    try:
        decoded = json.loads(published.text)
    except (TypeError, ValueError, RecursionError):
        logger.warning("dropped a message on %s that is not JSON text", published.channel)
        return None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("type"), str):
        logger.warning("dropped a message on %s without a string 'type'", published.channel)
        return None
    text = published.text
    if published.position is not None:
        decoded, text = with_position(decoded, text, published.position)
    return GroupEvent(decoded, text, published.channel, published.position)
