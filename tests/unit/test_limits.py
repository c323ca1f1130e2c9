"""Message rate, connection caps and the Origin allowlist, each with its close code."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from starlette_dream_ws import DreamWebSocketApp
from starlette_dream_ws.server import limits
from starlette_dream_ws.server.limits import RateLimiter, origin_allowed
from starlette_dream_ws.testing import ClientConnection, ConsumerTestClient

MakeApp = Callable[..., DreamWebSocketApp]


async def _greeted(ws: ClientConnection) -> None:
    assert (await ws.receive_json())["type"] == "connection_established"


@pytest.mark.anyio
async def test_messages_over_the_rate_are_dropped_with_an_error_then_closed_with_1008(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(max_messages_per_second=0.5, message_burst=3)) as client:
        async with client.connect("/dreams/1") as ws:
            await _greeted(ws)
            for n in range(3):  # the burst
                await ws.send_json({"type": "ping", "timestamp": n})
                assert await ws.receive_json() == {"type": "pong", "timestamp": n}
            await ws.send_json({"type": "ping", "timestamp": "over"})
            warning = await ws.receive_json()
            assert (warning["type"], warning["code"]) == ("error", "rate_limited")
            await ws.send_json({"type": "ping"})  # second drop: no answer
            await ws.send_json({"type": "ping"})  # third drop in a row: closed
            code, messages = await ws.expect_close()
    assert code == 1008
    assert [m.get("code") for m in messages] == ["rate_limited"]


def test_the_bucket_refills_with_time(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(limits.time, "monotonic", lambda: now[0])
    bucket = RateLimiter(rate=2, burst=2)
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    assert bucket.strikes == 1
    now[0] += 0.5  # one token back at 2 per second
    assert bucket.take() is True
    assert bucket.strikes == 0
    assert bucket.take() is False
    now[0] += 60  # never more than the burst
    assert [bucket.take() for _ in range(3)] == [True, True, False]


@pytest.mark.anyio
async def test_connections_per_user_are_capped_with_1013(make_app: MakeApp) -> None:
    app = make_app(max_connections_per_user=2)
    async with ConsumerTestClient(app) as client:
        async with client.connect("/dreams/1", user="ann") as one, client.connect("/dreams/2", user="ann") as two:
            await _greeted(one)
            await _greeted(two)
            async with client.connect("/dreams/3", user="ann") as third:
                code, messages = await third.expect_close()
            assert (code, messages[0]["code"]) == (1013, "too_many_connections")
            async with client.connect("/dreams/3", user="bob") as other_user:
                await _greeted(other_user)
        # Every connection ended: ann's count goes back to zero, and she may connect again.
        await _all_ended(app)
        assert "ann" not in app.context.per_user
        async with client.connect("/dreams/1", user="ann") as again:
            await _greeted(again)


async def _all_ended(app: DreamWebSocketApp) -> None:
    # Server-side teardown runs after the client is gone: wait for the app's drained event.
    drained = app.context.drained = asyncio.Event()
    if app.context.consumers:
        await asyncio.wait_for(drained.wait(), 5)
    app.context.drained = None


@pytest.mark.anyio
async def test_connections_per_app_are_capped_with_1013(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(max_connections=2)) as client:
        async with client.connect("/dreams/1", user="a") as one, client.connect("/dreams/1", user="b") as two:
            await _greeted(one)
            await _greeted(two)
            async with client.connect("/dreams/1", user="c") as third:
                code, messages = await third.expect_close()
    assert (code, messages[0]["code"]) == (1013, "too_many_connections")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("allowed", "origin", "accepted"),
    [
        ((), None, True),  # not a browser
        ((), "http://testserver", True),  # the page's own host
        ((), "https://evil.example", False),
        (("https://app.example",), "https://app.example", True),
        (("https://app.example",), "http://testserver", False),
        (("*",), "https://anything.example", True),
    ],
)
async def test_origin_allowlist(
    make_app: MakeApp, allowed: tuple[str, ...], origin: str | None, accepted: bool
) -> None:
    headers = {"Origin": origin} if origin is not None else {}
    async with ConsumerTestClient(make_app(allowed_origins=allowed)) as client:
        async with client.connect("/dreams/1", headers=headers) as ws:
            if accepted:
                await _greeted(ws)
            else:
                code, messages = await ws.expect_close()
                assert (code, messages[0]["code"]) == (1008, "origin_not_allowed")


def test_origin_allowed_compares_host_and_port() -> None:
    assert origin_allowed("https://example.com:8443", "example.com:8443", ())
    assert not origin_allowed("https://example.com:8443", "example.com", ())
    assert origin_allowed("https://EXAMPLE.com", "example.COM", ())
    assert not origin_allowed("null", "example.com", ())  # sandboxed iframes, file:// pages
    assert not origin_allowed("https://example.com.evil.net", "example.com", ())
