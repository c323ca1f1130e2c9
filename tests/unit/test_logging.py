"""Structured log events for connections, and no token in any log line."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from starlette_dream_ws import DreamWebSocketApp
from starlette_dream_ws.testing import ConsumerTestClient
from tests.support.authorizers import owner_only
from tests.support.tokens import UNIT_SECRET as SECRET

pytestmark = pytest.mark.anyio

MakeApp = Callable[..., DreamWebSocketApp]


def _events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.dream_ws for r in caplog.records if hasattr(r, "dream_ws")]


async def test_connect_and_close_are_logged_with_code_and_duration(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="starlette_dream_ws")
    app = make_app()
    async with ConsumerTestClient(app) as client:
        async with client.connect("/dreams/5", user="u5") as ws:
            await ws.receive_json()
        async with client.connect("/dreams/5", user="u5", headers={"Origin": "https://evil.example"}) as ws:
            await ws.expect_close()
    events = _events(caplog)
    connected = [e for e in events if e["event"] == "connected"]
    closed = [e for e in events if e["event"] == "closed"]
    assert connected[0] == {"event": "connected", "path": "/dreams/5", "user": "u5"}
    assert closed[0]["by"] == "client" and closed[0]["user"] == "u5"
    assert float(closed[0]["duration"]) >= 0
    assert {
        "event": "refused",
        "path": "/dreams/5",
        "reason": "origin_not_allowed",
        "origin": "https://evil.example",
        "setting": "DREAM_WS_ALLOWED_ORIGINS",
    } in events
    assert closed[-1]["code"] == 1008 and closed[-1]["by"] == "server"


def _token(claims: dict[str, object], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


FAILURES: dict[str, Callable[[], str]] = {
    "expired": lambda: _token({"sub": "u1", "exp": int(time.time()) - 5}),
    "bad_signature": lambda: _token({"sub": "u1", "exp": int(time.time()) + 60}, "x" * 40),
    "missing_claim": lambda: _token({"exp": int(time.time()) + 60}),
    "not_yet_valid": lambda: _token({"sub": "u1", "exp": int(time.time()) + 60, "nbf": int(time.time()) + 60}),
    "invalid_token": lambda: "garbage-that-is-no-jwt",
    "forbidden": lambda: _token({"sub": "u2", "exp": int(time.time()) + 60}),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
@pytest.mark.parametrize("transport", ["query", "header", "subprotocol"])
async def test_auth_failures_are_logged_without_the_token(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture, case: str, transport: str
) -> None:
    caplog.set_level(logging.DEBUG)  # every level
    token = FAILURES[case]()
    async with ConsumerTestClient(make_app(authorize=owner_only)) as client:
        async with client.connect("/dreams/1", token=token, transport=transport) as ws:  # type: ignore[arg-type]
            code, _ = await ws.expect_close()
    assert code == (4403 if case == "forbidden" else 4401)
    # The server's loggers: ours and uvicorn's (the test client's own httpx log is not the server's).
    ours = [r for r in caplog.records if r.name.startswith(("starlette_dream_ws", "uvicorn"))]
    logged = "".join(r.getMessage() + repr(r.__dict__) for r in ours)
    for part in {token, *token.split(".")} - {""}:
        assert part not in logged
    if case != "forbidden":
        assert {"event": "auth_failed", "path": "/dreams/1", "reason": case} in _events(caplog)
