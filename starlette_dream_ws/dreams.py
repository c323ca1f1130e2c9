"""Dream image updates: the status values, the update message, and `DreamImagesConsumer`."""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Sequence
from typing import Any

from .auth import SUBPROTOCOL, call_authorizer
from .consumer import CloseCodes, CloseConnection, Consumer


class ImageStatus(enum.StrEnum):
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    DELETE_PROCESSING = "delete_processing"
    DELETE_COMPLETED = "delete_completed"
    DELETE_FAILED = "delete_failed"


STATUSES = frozenset(status.value for status in ImageStatus)


def dream_group(dream_id: int) -> str:
    """The group every connection watching `dream_id` joins."""
    return f"dream_images_{dream_id}"


def image_update_message(
    dream_id: int,
    image_urls: Sequence[str] | None = None,
    status: str = "processing",
    message: str | None = None,
) -> dict[str, Any]:
    """Validate an update and build the `image_update` message clients receive.

    Raises `ValueError` (or `TypeError`) before anything is published.
    """
    if isinstance(dream_id, bool) or not isinstance(dream_id, int):
        raise TypeError(f"dream_id must be an int, got {type(dream_id).__name__}")
    if dream_id <= 0:
        raise ValueError(f"dream_id must be positive, got {dream_id}")
    status = str(status.value) if isinstance(status, ImageStatus) else status
    if status not in STATUSES:
        raise ValueError(f"status must be one of {sorted(STATUSES)}, got {status!r}")
    if isinstance(image_urls, str | bytes):
        raise TypeError("image_urls must be a list of URL strings, not one string")
    images = list(image_urls or ())
    if not all(isinstance(url, str) for url in images):
        raise TypeError("image_urls must be a list of URL strings")
    if message is not None and not isinstance(message, str):
        raise TypeError("message must be a string or None")
    return {
        "type": "image_update",
        "dream_id": dream_id,
        "status": status,
        "images": images,
        "timestamp": time.time(),
        "message": message,
    }


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
        await super().connect()
        await self.group_add(self.group_name)
        await self.send_json(
            {
                "type": "connection_established",
                "dream_id": self.dream_id,
                "heartbeat_interval": self.settings.heartbeat_interval,
            }
        )

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
            await self.send_error("status_unknown", "no update has been recorded for this dream yet")
            return
        await self.send_json(latest)

    async def receive_refresh_token(self, content: dict[str, Any]) -> None:
        """Replace the connection's token before it expires; it must name the same user."""
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
        await self.send_json({"type": "token_refreshed", "expires_at": user.expires_at})
