"""Heartbeat over a real server with a short interval: pings, 4408 for a silent client, and the
token expiry checked by the same timer (4401, unless the client refreshes its token)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from tests.support.processes import workdir
from tests.support.redis import RedisServer
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer, server_env, serving

from .client import connect_dream, established, expect_close, recv_json, send_json

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

INTERVAL = 0.3
TIMEOUT = 2 * INTERVAL  # the default heartbeat_timeout


@pytest.fixture(scope="module")
def fast_heartbeat_server(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UvicornServer]:
    env = server_env(redis_server.url, DREAM_WS_HEARTBEAT_INTERVAL=str(INTERVAL))
    server = UvicornServer(env, workdir=workdir(tmp_path_factory, "fast-heartbeat"))
    with serving(server):
        yield server


async def test_a_silent_client_gets_pings_then_4408(
    fast_heartbeat_server: UvicornServer, make_token: TokenFactory
) -> None:
    started = time.monotonic()
    async with connect_dream(fast_heartbeat_server, 7, make_token("u7")) as ws:
        assert (await established(ws, 7))["heartbeat_interval"] == INTERVAL
        pings = 0
        while (message := await recv_json(ws, timeout=2))["type"] == "ping":
            assert isinstance(message["timestamp"], float)
            pings += 1
        assert message["type"] == "error" and message["code"] == "heartbeat_timeout", message
        assert await expect_close(ws, timeout=2) == 4408
    elapsed = time.monotonic() - started
    assert pings >= 1
    # Due at 0.6 s of silence; the shared timer ticks every interval/4.
    assert TIMEOUT - 0.05 <= elapsed <= TIMEOUT + 0.6, elapsed


async def test_a_client_that_answers_pings_stays_open(
    fast_heartbeat_server: UvicornServer, make_token: TokenFactory
) -> None:
    async with connect_dream(fast_heartbeat_server, 7, make_token("u7"), "subprotocol") as ws:
        await established(ws, 7)
        started = time.monotonic()
        pings = 0
        # Driven by the server's pings: no sleeping, and well past 2 x the timeout.
        while time.monotonic() - started < 3 * TIMEOUT:
            message = await recv_json(ws, timeout=2)
            assert message["type"] == "ping", message
            pings += 1
            await send_json(ws, {"type": "pong", "timestamp": message["timestamp"]})
        assert pings >= 4
        # Still open and served.
        await send_json(ws, {"type": "ping", "timestamp": 1.0})
        while (reply := await recv_json(ws, timeout=2))["type"] == "ping":
            pass
        assert reply == {"type": "pong", "timestamp": 1.0}


async def next_non_ping(ws: ClientConnection, timeout: float = 2.0) -> dict[str, Any]:
    """Answer the server's pings (staying alive) until something else arrives; return it."""
    while (message := await recv_json(ws, timeout))["type"] == "ping":
        await send_json(ws, {"type": "pong"})
    return message


async def test_a_token_that_expires_while_connected_ends_the_connection_with_4401(
    fast_heartbeat_server: UvicornServer, make_token: TokenFactory
) -> None:
    expires_at = int(time.time() + 2)  # 1 to 2 s from now, as make_token rounds it
    async with connect_dream(fast_heartbeat_server, 7, make_token("u7", expires_in=2)) as ws:
        await established(ws, 7)
        error = await next_non_ping(ws, timeout=3)
        assert time.time() >= expires_at - 0.05  # not before the token's `exp`
        assert error["type"] == "error" and error["code"] == "token_expired", error
        assert await expect_close(ws) == 4401
    assert time.time() <= expires_at + 1.0


async def test_refresh_token_keeps_the_connection_past_the_old_expiry(
    fast_heartbeat_server: UvicornServer, make_token: TokenFactory
) -> None:
    old_expiry = int(time.time() + 2)
    async with connect_dream(fast_heartbeat_server, 7, make_token("u7", expires_in=2), "subprotocol") as ws:
        await established(ws, 7)
        await send_json(ws, {"type": "refresh_token", "token": make_token("u7", expires_in=300)})
        refreshed = await next_non_ping(ws)
        assert refreshed["type"] == "token_refreshed", refreshed
        assert isinstance(refreshed["expires_at"], float) and refreshed["expires_at"] > old_expiry + 200
        # Alive (answering pings) until well past the old token's expiry: nothing but pings comes.
        while time.time() < old_expiry + 0.5:
            message = await recv_json(ws, timeout=2)
            assert message["type"] == "ping", message
            await send_json(ws, {"type": "pong"})
        await send_json(ws, {"type": "ping", "timestamp": 2.0})
        assert await next_non_ping(ws) == {"type": "pong", "timestamp": 2.0}


async def test_refresh_token_for_another_user_is_4401(
    fast_heartbeat_server: UvicornServer, make_token: TokenFactory
) -> None:
    async with connect_dream(fast_heartbeat_server, 7, make_token("u7"), "header") as ws:
        await established(ws, 7)
        await send_json(ws, {"type": "refresh_token", "token": make_token("admin")})
        error = await next_non_ping(ws)
        assert error["type"] == "error" and error["code"] == "unauthenticated", error
        assert await expect_close(ws) == 4401
