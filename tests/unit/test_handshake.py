"""The JWT handshake over the in-process transport: transports, refusals, close codes."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from httpx_ws import WebSocketDisconnect, aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport

from starlette_dream_ws import ConfigurationError, DreamWebSocketApp, User
from starlette_dream_ws.testing import ConsumerTestClient
from tests.support.authorizers import owner_only
from tests.support.tokens import UNIT_SECRET as SECRET

pytestmark = pytest.mark.anyio

MakeApp = Callable[..., DreamWebSocketApp]


@pytest.mark.parametrize("transport", ["query", "header", "subprotocol"])
async def test_each_token_transport_is_accepted(make_app: MakeApp, transport: str) -> None:
    async with ConsumerTestClient(make_app(heartbeat_interval=12)) as client:
        async with client.connect("/dreams/42", transport=transport) as ws:  # type: ignore[arg-type]
            first = await ws.receive_json()
            assert first.pop("epoch")
            assert first == {"type": "connection_established", "dream_id": 42, "heartbeat_interval": 12, "seq": 0}
            # The token subprotocol is never echoed: the server selects the plain one.
            assert ws.subprotocol == ("dream-ws.v1" if transport == "subprotocol" else None)


def _none_token(claims: dict[str, object]) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def _token(claims: dict[str, object], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


BAD_TOKENS = {
    "expired": lambda: _token({"sub": "u1", "exp": int(time.time()) - 10}),
    "wrong_secret": lambda: _token({"sub": "u1", "exp": int(time.time()) + 60}, "another-secret-of-32-bytes-length!!"),
    "alg_none": lambda: _none_token({"sub": "u1", "exp": int(time.time()) + 60}),
    "no_sub": lambda: _token({"exp": int(time.time()) + 60}),
    "no_exp": lambda: _token({"sub": "u1"}),
    "not_yet_valid": lambda: _token({"sub": "u1", "exp": int(time.time()) + 60, "nbf": int(time.time()) + 30}),
    "garbage": lambda: "not.a.jwt",
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_get_unauthenticated_and_4401(make_app: MakeApp, case: str) -> None:
    async with ConsumerTestClient(make_app()) as client:
        async with client.connect("/dreams/1", token=BAD_TOKENS[case]()) as ws:
            code, messages = await ws.expect_close()
    assert code == 4401
    assert [m["type"] for m in messages] == ["error"]
    assert messages[0]["code"] == "unauthenticated"


async def test_missing_token_gets_4401(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client, client.connect("/dreams/1", user=None) as ws:
        code, messages = await ws.expect_close()
    assert code == 4401
    assert messages[0]["code"] == "unauthenticated"


async def test_audience_and_issuer_are_checked(make_app: MakeApp) -> None:
    app = make_app(jwt_audience="dreams", jwt_issuer="https://auth.example")
    async with ConsumerTestClient(app) as client:
        good = client.token("u1")
        async with client.connect("/dreams/1", token=good) as ws:
            assert (await ws.receive_json())["type"] == "connection_established"
        for claims in ({"aud": "other"}, {"iss": "https://evil.example"}):
            async with client.connect("/dreams/1", token=client.token("u1", **claims)) as ws:
                code, _ = await ws.expect_close()
            assert code == 4401


async def test_authorizer_refusal_is_forbidden_4403(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app(authorize=owner_only)) as client:
        async with client.connect("/dreams/2", user="u1") as ws:
            code, messages = await ws.expect_close()
        assert code == 4403
        assert messages == [{"type": "error", "code": "forbidden", "message": messages[0]["message"]}]
        async with client.connect("/dreams/1", user="u1") as ws:
            assert (await ws.receive_json())["type"] == "connection_established"


async def test_async_authorizer_is_awaited(make_app: MakeApp) -> None:
    seen: list[tuple[str, int]] = []

    async def authorize(user: User, dream_id: int) -> bool:
        seen.append((user.id, dream_id))
        return dream_id == 7

    async with ConsumerTestClient(make_app(authorize=authorize)) as client:
        async with client.connect("/dreams/7", user="alice") as ws:
            assert (await ws.receive_json())["type"] == "connection_established"
        async with client.connect("/dreams/8", user="alice") as ws:
            assert (await ws.expect_close())[0] == 4403
    assert seen == [("alice", 7), ("alice", 8)]


async def test_truthy_non_bool_authorizer_result_does_not_grant(make_app: MakeApp) -> None:
    # Only an explicit True grants access: a forgotten `return` or a stray string must not.
    async with ConsumerTestClient(make_app(authorize=lambda user, dream_id: "yes")) as client:
        async with client.connect("/dreams/1") as ws:
            assert (await ws.expect_close())[0] == 4403


def test_an_authorizer_is_required() -> None:
    with pytest.raises(ConfigurationError, match="allow_any_authenticated_user"):
        DreamWebSocketApp(authorize=None, jwt_secret=SECRET)


async def test_a_verification_key_is_checked_when_the_app_starts() -> None:
    # Made without a secret (importing the app must work for tools and tests), refused at start.
    app = DreamWebSocketApp(authorize=owner_only, jwt_secret=None)
    with pytest.raises(ConfigurationError, match="jwt_secret"):
        async with app.lifespan():
            pass


async def test_without_a_key_a_connection_gets_1011_and_the_log_says_why(caplog: pytest.LogCaptureFixture) -> None:
    # Mounted apps have no lifespan: the first connection is where the check happens.
    app = DreamWebSocketApp(authorize=owner_only, jwt_secret=None)
    async with ASGIWebSocketTransport(app) as transport, httpx.AsyncClient(transport=transport) as http:
        for _ in range(2):  # refused every time, not only the first
            async with aconnect_ws("http://testserver/dreams/1?token=x", http) as ws:
                assert (await ws.receive_json())["code"] == "internal_error"
                with pytest.raises(WebSocketDisconnect) as closed:
                    await ws.receive_json()
            assert closed.value.code == 1011
        response = await http.get("http://testserver/dreams/1/events?token=x")
    assert response.status_code == 500
    assert response.json()["code"] == "internal_error"
    assert "jwt_secret" in caplog.text


async def test_dream_id_zero_is_refused(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client, client.connect("/dreams/0") as ws:
        code, messages = await ws.expect_close()
    assert code == 1008
    assert messages[0]["code"] == "invalid_dream_id"


def test_a_subprotocol_header_given_as_one_entry_is_split() -> None:
    # Some servers pass `Sec-WebSocket-Protocol` as one comma-separated entry instead of a list.
    from starlette_dream_ws.server.connection import Connection
    from starlette_dream_ws.server.metrics import ConnectionMetrics

    async def nothing(*_: object) -> Any:
        raise AssertionError("not used")

    scope = {"type": "websocket", "subprotocols": ["dream-ws.v1, dream-ws.bearer.abc.def", " other "]}
    connection = Connection(scope, nothing, nothing, ConnectionMetrics())
    assert connection.offered_subprotocols() == ["dream-ws.v1", "dream-ws.bearer.abc.def", "other"]
