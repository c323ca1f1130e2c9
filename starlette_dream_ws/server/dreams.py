"""The dream images endpoint: `DreamImagesConsumer` and `DreamWebSocketApp`, ready to mount."""

from __future__ import annotations

import json
from typing import Any

from ..groups import GroupEvent
from ..protocol import SUBPROTOCOL, CloseCodes, dream_group
from ..settings import ConfigurationError, Settings
from .app import ConsumerApp
from .auth import Authorizer, call_authorizer
from .connection import CloseConnection
from .consumer import Consumer
from .outbox import StatusAnswer
from .resume import requested_position


class DreamImagesConsumer(Consumer):
    """Streams one dream's image updates to a browser.

    Connect at `/dreams/{dream_id}` with a token; the first message is
    `connection_established`, then every `image_update` of the dream.
    """

    subprotocol = SUBPROTOCOL

    @property
    def dream_id(self) -> int:
        return int(self.scope["path_params"]["dream_id"])

    @property
    def group_name(self) -> str:
        return dream_group(self.dream_id)

    async def authorize(self) -> bool:
        assert self.user is not None
        if self.context.authorize is None:
            return False
        return await call_authorizer(self.context.authorize, self.user, self.dream_id)

    async def connect(self) -> None:
        if self.dream_id <= 0:
            raise CloseConnection(CloseCodes.POLICY_VIOLATION, "invalid_dream_id", "dream ids are positive integers")
        since = requested_position(self.scope)
        await super().connect()
        group = self.group_name
        await self.group_add(group)
        greeting: dict[str, Any] = {
            "type": "connection_established",
            "dream_id": self.dream_id,
            "heartbeat_interval": self.settings.heartbeat_interval,
        }
        events: list[GroupEvent] = []
        position = self.layer.position(group)
        if since is not None:
            resumed = await self.resume(group, since)
            greeting["recovered"], events = resumed.recovered, resumed.events
            position = resumed.current if resumed.current.follows(position) else position
        if position is not None:
            greeting["epoch"], greeting["seq"] = position.epoch, position.seq
        await self.send_json(greeting)
        for event in events:
            await self.send_json(event)

    # -- group events -----------------------------------------------------------------------

    async def image_update(self, event: dict[str, Any]) -> None:
        # Producers publish the client message itself (see `image_update_message`).
        await self.send_json(event)

    # -- client messages --------------------------------------------------------------------

    async def receive_ping(self, content: dict[str, Any]) -> None:
        pong: dict[str, Any] = {"type": "pong"}
        if "timestamp" in content:
            pong["timestamp"] = content["timestamp"]
        try:
            # Echoed as sent, unless it cannot be valid JSON in a text frame (NaN, lone surrogates).
            text = json.dumps(pong, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
            text.encode("utf-8")
        except (ValueError, RecursionError, UnicodeEncodeError):
            await self.send_error("invalid_message", "the timestamp cannot be echoed as JSON")
            return
        await self.send_text(text)

    async def receive_pong(self, content: dict[str, Any]) -> None:
        """Liveness only: any frame already counts."""

    async def receive_request_status(self, content: dict[str, Any]) -> None:
        requested = content.get("dream_id", self.dream_id)
        if isinstance(requested, bool) or not isinstance(requested, int | str):
            await self.send_error("invalid_message", "dream_id must be an integer")
            return
        if str(requested) != str(self.dream_id):
            await self.send_error("forbidden", "this connection may only ask about its own dream")
            return
        try:
            latest = await self.layer.latest(self.group_name)
        except Exception:
            await self.send_error("unavailable", "the latest status cannot be read right now")
            return
        if latest is None:
            latest = self.last_sent(self.group_name)
        if latest is None:
            await self.send_error("status_unknown", "no update has been recorded for this dream yet")
            return
        # Through the outbox, in order with the live updates: the answer is never older.
        self.outbox.put_now(StatusAnswer(latest))

    async def receive_refresh_token(self, content: dict[str, Any]) -> None:
        """Replace the connection's token before it expires; it must name the same user, who
        is authorized again (a user whose access was revoked gets 4403, not more updates)."""
        token = content.get("token")
        if not isinstance(token, str) or self.context.verifier is None:
            await self.send_error("invalid_message", "refresh_token needs a 'token' string")
            return
        try:
            user = self.context.verifier.verify(token)
        except Exception:
            raise CloseConnection(CloseCodes.UNAUTHENTICATED, "unauthenticated", "the new token is not valid") from None
        if self.user is None or user.id != self.user.id:
            raise CloseConnection(CloseCodes.UNAUTHENTICATED, "unauthenticated", "the new token is for another user")
        self.user = user
        if not await self.authorize():
            raise CloseConnection(CloseCodes.FORBIDDEN, "forbidden", "you may no longer watch this")
        await self.send_json({"type": "token_refreshed", "expires_at": user.expires_at})


class DreamWebSocketApp(ConsumerApp):
    """The dream images endpoint, `/dreams/{dream_id}`, ready to mount.

    `authorize(user, dream_id)` decides who may watch which dream (it may be async). To let
    every authenticated user watch every dream, pass `allow_any_authenticated_user`.
    """

    def __init__(
        self,
        *,
        authorize: Authorizer | None,
        settings: Settings | None = None,
        consumer: type[DreamImagesConsumer] = DreamImagesConsumer,
        path: str = "/dreams/{dream_id:int}",
        **overrides: Any,
    ) -> None:
        if authorize is None:
            raise ConfigurationError(
                "authorize is required: pass a function (user, dream_id) -> bool, or "
                "allow_any_authenticated_user to let any authenticated user watch any dream"
            )
        super().__init__({path: consumer}, authorize=authorize, settings=settings, **overrides)
