"""Each group's local members, where its delivery stands, and the fan-out to them."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

from .contract import Position, Published
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
        if position is not None and (self.position is None or position > self.position):
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
            if self.position is not None and not position > self.position:
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

    def catch_up(self, missed: list[Published]) -> int:
        """Deliver what was missed, then what was held meanwhile, in order; how many were new."""
        held, self.backlog = self.backlog or [], None
        return sum(self.receive(published) for published in [*missed, *held])


def decode(published: Published) -> GroupEvent | None:
    """The event members get: decoded once for all of them; None (logged) for junk."""
    try:
        decoded = json.loads(published.text)
    except (TypeError, ValueError, RecursionError):
        logger.warning("dropped a message on %s that is not JSON text", published.channel)
        return None
    if isinstance(decoded, dict) and isinstance(decoded.get("type"), str):
        return GroupEvent(decoded, published.text)
    logger.warning("dropped a message on %s without a string 'type'", published.channel)
    return None
