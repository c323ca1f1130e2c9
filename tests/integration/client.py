"""WebSocket client helpers: every receive has a timeout, close codes are read from the frame."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from tests.support.uvicorn import UvicornServer

#: Seconds any single receive may wait.
RECEIVE_TIMEOUT = 5.0

Transport = Literal["query", "header", "subprotocol"]
TRANSPORTS: tuple[Transport, ...] = ("query", "header", "subprotocol")
SUBPROTOCOL = "dream-ws.v1"


def connect_dream(
    server: UvicornServer, dream_id: int | str, token: str | None = None, transport: Transport = "query"
) -> connect:
    """Open `/dreams/<dream_id>` on `server`, the token travelling by `transport`."""
    url = server.ws_url(f"/dreams/{dream_id}")
    headers: dict[str, str] | None = None
    subprotocols: list[Subprotocol] | None = None
    if token is not None:
        if transport == "query":
            url += f"?token={token}"
        elif transport == "header":
            headers = {"Authorization": f"Bearer {token}"}
        else:
            subprotocols = [Subprotocol(SUBPROTOCOL), Subprotocol(f"dream-ws.bearer.{token}")]
    # No client keepalive pings: liveness in these tests is the app-level protocol only.
    return connect(
        url, additional_headers=headers, subprotocols=subprotocols, open_timeout=5, close_timeout=2, ping_interval=None
    )


async def recv_json(ws: ClientConnection, timeout: float = RECEIVE_TIMEOUT) -> dict[str, Any]:
    text = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(text, str), f"expected a text frame, got {text!r}"
    value = json.loads(text)
    assert isinstance(value, dict) and isinstance(value.get("type"), str), value
    return value


async def send_json(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


async def expect_close(ws: ClientConnection, timeout: float = RECEIVE_TIMEOUT) -> int:
    """The close code the server sent; fails on any further message or an abrupt end (1006)."""
    try:
        extra = await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, f"no close frame from the server (1006): {exc!r}"
        return exc.rcvd.code
    raise AssertionError(f"expected the server to close, got {extra!r}")


async def established(ws: ClientConnection, dream_id: int, timeout: float = RECEIVE_TIMEOUT) -> dict[str, Any]:
    """The first message: `connection_established` for `dream_id`."""
    first = await recv_json(ws, timeout)
    assert first["type"] == "connection_established", first
    assert first["dream_id"] == dream_id
    assert isinstance(first["heartbeat_interval"], int | float) and first["heartbeat_interval"] > 0
    return first
