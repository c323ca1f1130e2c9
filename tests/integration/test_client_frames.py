"""Client frames through uvicorn's WebSocket stack: bad input is answered, oversize is closed."""

from __future__ import annotations

import pytest

from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer

from .client import connect_dream, established, expect_close, recv_json, send_json

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_bad_frames_get_errors_and_the_connection_stays_open(
    servers: tuple[UvicornServer, UvicornServer], make_token: TokenFactory
) -> None:
    async with connect_dream(servers[0], 7, make_token("u7")) as ws:
        await established(ws, 7)
        for frame, code in (
            ("{not json", "invalid_json"),
            ("[1, 2]", "invalid_message"),
            ('{"no": "type"}', "invalid_message"),
            ('{"type": "image_update", "dream_id": 7}', "unknown_type"),  # clients cannot publish
            ('{"type": "disconnect"}', "unknown_type"),  # nor reach the life-cycle API
            (b"\x00binary", "binary_not_supported"),
        ):
            await ws.send(frame)
            error = await recv_json(ws)
            assert error["type"] == "error" and error["code"] == code, (frame, error)
        await send_json(ws, {"type": "ping"})
        assert await recv_json(ws) == {"type": "pong"}


async def test_a_frame_over_max_message_size_is_closed_with_1009(
    servers: tuple[UvicornServer, UvicornServer], make_token: TokenFactory
) -> None:
    async with connect_dream(servers[1], 7, make_token("u7"), "header") as ws:
        await established(ws, 7)
        # 64 KiB by default; far below uvicorn's own 16 MiB limit, so the app decides.
        await send_json(ws, {"type": "ping", "padding": "x" * (64 * 1024)})
        error = await recv_json(ws)
        assert error["type"] == "error" and error["code"] == "message_too_big", error
        assert await expect_close(ws) == 1009
