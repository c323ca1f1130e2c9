"""What an app shares with every connection it runs."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..groups import GroupLayer
from ..settings import Settings
from .auth import Authenticator, TokenVerifier
from .heartbeat import Heartbeat
from .metrics import ConnectionMetrics
from .outbox import SendScheduler

if TYPE_CHECKING:
    from .consumer import Consumer


@dataclasses.dataclass
class ConsumerContext:
    """The app's settings, groups layer, verifier, heartbeat and open connections."""

    settings: Settings
    layer: GroupLayer
    #: Verifies tokens; made when the app starts (None until then, and with `authenticate`).
    verifier: TokenVerifier | None
    heartbeat: Heartbeat
    #: The integrator's authorizer, called by the consumer's `authorize()`.
    authorize: Callable[..., bool | Awaitable[bool]] | None = None
    #: The integrator's own authentication (session, cookie), used instead of tokens.
    authenticate: Authenticator | None = None
    #: Open consumers, so the app can close them on shutdown.
    consumers: set[Consumer] = dataclasses.field(default_factory=set)
    #: Set when the last consumer has ended, while the app is shutting down.
    drained: asyncio.Event | None = None
    #: Open connections per authenticated user id.
    per_user: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    metrics: ConnectionMetrics = dataclasses.field(default_factory=ConnectionMetrics)
    scheduler: SendScheduler = dataclasses.field(default_factory=SendScheduler)

    def count_user(self, user_id: str) -> bool:
        """Count one more connection of `user_id`; False (nothing counted) past the limit."""
        if self.per_user[user_id] >= self.settings.max_connections_per_user:
            return False
        self.per_user[user_id] += 1
        return True

    def release_user(self, user_id: str) -> None:
        self.per_user[user_id] -= 1
        if self.per_user[user_id] <= 0:
            del self.per_user[user_id]

    def remove(self, consumer: Consumer) -> None:
        self.consumers.discard(consumer)
        if not self.consumers and self.drained is not None:
            self.drained.set()
