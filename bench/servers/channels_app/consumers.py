"""The dream status consumer: JWT from the subprotocol, one group per dream."""

import os
from typing import Any

import jwt
from channels.generic.websocket import AsyncJsonWebsocketConsumer

SUBPROTOCOL = "dream-ws.v1"
TOKEN_PREFIX = "dream-ws.bearer."
JWT_SECRET = os.environ["BENCH_JWT_SECRET"]


def group_name(dream_id: int) -> str:
    """The channel layer group that carries one dream's updates."""
    return f"dream_images_{dream_id}"


def authenticate(subprotocols: list[str]) -> bool:
    """True when the offered subprotocols carry a valid HS256 token with `exp` and `sub`."""
    for offered in subprotocols:
        if offered.startswith(TOKEN_PREFIX):
            try:
                jwt.decode(
                    offered[len(TOKEN_PREFIX) :],
                    JWT_SECRET,
                    algorithms=["HS256"],
                    options={"require": ["exp", "sub"]},
                )
            except jwt.InvalidTokenError:
                return False
            return True
    return False


class DreamConsumer(AsyncJsonWebsocketConsumer):
    """Streams one dream's image updates to an authenticated client."""

    async def connect(self) -> None:
        self.dream_id: int = self.scope["url_route"]["kwargs"]["dream_id"]
        self.group = group_name(self.dream_id)
        self.joined = False
        if not authenticate(self.scope["subprotocols"]):
            # A close before the accept is an HTTP 403 under ASGI and loses the code:
            # accept first so the client sees 4401.
            await self.accept(SUBPROTOCOL)
            await self.close(code=4401)
            return
        await self.channel_layer.group_add(self.group, self.channel_name)
        self.joined = True
        await self.accept(SUBPROTOCOL)
        await self.send_json({"type": "connection_established", "dream_id": self.dream_id})

    async def disconnect(self, code: int) -> None:
        if self.joined:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def image_update(self, event: dict[str, Any]) -> None:
        """Handler for `image.update` group messages: forward the update to the client."""
        await self.send_json(
            {
                "type": "image_update",
                "dream_id": event["dream_id"],
                "status": event["status"],
                "images": event["images"],
                "timestamp": event["timestamp"],
                "message": event["message"],
            }
        )
