"""Server pings, the 4408 silence timeout, and tokens that expire while connected."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from starlette_dream_ws import DreamWebSocketApp
from starlette_dream_ws.testing import ConsumerTestClient

pytestmark = pytest.mark.anyio

MakeApp = Callable[..., DreamWebSocketApp]


async def test_server_pings_every_interval(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(heartbeat_interval=0.1, heartbeat_timeout=5)) as client:
        async with client.connect("/dreams/1") as ws:
            established = await ws.receive_json()
            assert established["heartbeat_interval"] == 0.1
            pings = [await ws.receive_json(timeout=2) for _ in range(3)]
    assert [p["type"] for p in pings] == ["ping", "ping", "ping"]
    stamps = [p["timestamp"] for p in pings]
    assert all(isinstance(s, float) for s in stamps)
    assert stamps == sorted(stamps)
    # One per interval, give or take the heartbeat tick.
    assert 0.05 < (stamps[-1] - stamps[0]) / 2 < 0.5


async def test_silent_client_is_closed_with_4408(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(heartbeat_interval=0.1, heartbeat_timeout=0.3)) as client:
        async with client.connect("/dreams/1") as ws:
            await ws.receive_json()
            started = time.monotonic()
            code, messages = await ws.expect_close(timeout=3)
            silent_for = time.monotonic() - started
    assert code == 4408
    assert messages[-1]["code"] == "heartbeat_timeout"
    assert {m["type"] for m in messages[:-1]} <= {"ping"}
    assert 0.25 <= silent_for < 1.5


async def test_a_client_that_answers_stays_open(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(heartbeat_interval=0.1, heartbeat_timeout=0.3)) as client:
        async with client.connect("/dreams/1") as ws:
            await ws.receive_json()
            deadline = time.monotonic() + 1.0  # more than three timeouts
            answered = 0
            while time.monotonic() < deadline:
                message = await ws.receive_json(timeout=1)
                assert message["type"] == "ping"
                await ws.send_json({"type": "pong", "timestamp": message["timestamp"]})
                answered += 1
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_until("pong"))["type"] == "pong"
    assert answered >= 5


async def test_token_expiring_while_connected_closes_with_4401(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(heartbeat_interval=0.1, heartbeat_timeout=10)) as client:
        # `exp` is whole seconds: 1 s could leave no time at all for the handshake.
        token = client.token("u1", expires_in=2)
        async with client.connect("/dreams/1", token=token) as ws:
            assert (await ws.receive_json())["type"] == "connection_established"
            code, messages = await ws.expect_close(timeout=5)
    assert code == 4401
    assert messages[-1]["code"] == "token_expired"


async def test_refresh_token_keeps_the_connection(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(heartbeat_interval=0.1, heartbeat_timeout=10)) as client:
        async with client.connect("/dreams/1", token=client.token("u1", expires_in=1)) as ws:
            await ws.receive_json()
            await ws.send_json({"type": "refresh_token", "token": client.token("u1", expires_in=60)})
            refreshed = await ws.receive_until("token_refreshed")
            assert refreshed["expires_at"] > time.time() + 30
            # Well past the first token's expiry, the connection still answers.
            await ws.receive_until("ping", timeout=3)
            until = time.time() + 1.5
            while time.time() < until:
                await ws.receive_until("ping", timeout=3)
            await ws.send_json({"type": "ping", "timestamp": "alive"})
            assert (await ws.receive_until("pong"))["timestamp"] == "alive"


async def test_refresh_token_for_another_user_closes_with_4401(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client, client.connect("/dreams/1", user="u1") as ws:
        await ws.receive_json()
        await ws.send_json({"type": "refresh_token", "token": client.token("u2")})
        code, messages = await ws.expect_close()
    assert code == 4401
    assert messages[-1]["code"] == "unauthenticated"


async def test_a_refreshed_token_is_authorized_again_and_a_revoked_user_gets_4403(make_app: MakeApp) -> None:
    allowed = {"u1"}
    app = make_app(authorize=lambda user, dream_id: user.id in allowed)
    async with ConsumerTestClient(app) as client, client.connect("/dreams/1", user="u1") as ws:
        await ws.receive_json()
        await ws.send_json({"type": "refresh_token", "token": client.token("u1")})
        assert (await ws.receive_until("token_refreshed"))["type"] == "token_refreshed"
        allowed.clear()  # access revoked while connected
        await ws.send_json({"type": "refresh_token", "token": client.token("u1")})
        code, messages = await ws.expect_close()
    assert code == 4403
    assert messages[-1]["code"] == "forbidden"
