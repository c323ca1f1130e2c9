"""The JWT handshake over a real server: error message first, then 4401/4403 (never 1006)."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import ClientConnection

from tests.support.tokens import OTHER_SECRET, TokenFactory
from tests.support.uvicorn import UvicornServer

from .client import SUBPROTOCOL, TRANSPORTS, Transport, connect_dream, established, expect_close, recv_json

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

BAD_TOKENS = ["expired", "bad_signature", "malformed", "no_sub", "alg_none"]


def bad_token(kind: str, make_token: TokenFactory) -> str:
    if kind == "expired":
        return make_token("u7", expires_in=-60)
    if kind == "bad_signature":
        return make_token("u7", secret=OTHER_SECRET)
    if kind == "malformed":
        return "not.a.jwt"
    if kind == "no_sub":
        return make_token("")
    if kind == "alg_none":
        # header {"alg":"none","typ":"JWT"}, payload {"sub":"admin","exp":4102444800}, no signature
        return "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhZG1pbiIsImV4cCI6NDEwMjQ0NDgwMH0."
    raise AssertionError(kind)


async def assert_refused(ws: ClientConnection, code: str, close_code: int) -> None:
    error = await recv_json(ws)
    assert error["type"] == "error" and error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert await expect_close(ws) == close_code


async def test_missing_token_is_4401(servers: tuple[UvicornServer, UvicornServer]) -> None:
    async with connect_dream(servers[0], 7, token=None) as ws:
        await assert_refused(ws, "unauthenticated", 4401)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", BAD_TOKENS)
async def test_invalid_token_is_4401_whatever_the_transport(
    servers: tuple[UvicornServer, UvicornServer], make_token: TokenFactory, kind: str, transport: Transport
) -> None:
    token = bad_token(kind, make_token)
    log_start = len(servers[1].log_text())
    async with connect_dream(servers[1], 7, token, transport) as ws:
        # The subprotocol is answered even when the token is refused (the close code must reach a browser).
        assert ws.subprotocol == (SUBPROTOCOL if transport == "subprotocol" else None)
        await assert_refused(ws, "unauthenticated", 4401)
        # uvicorn logs the handshake's path with its query string; the app redacts the token there.
        log = servers[1].log_text()[log_start:]
        assert token not in log
        if transport == "query":
            assert "token=[redacted]" in log


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_user_not_allowed_is_4403(
    servers: tuple[UvicornServer, UvicornServer], make_token: TokenFactory, transport: Transport
) -> None:
    async with connect_dream(servers[0], 7, make_token("u8"), transport) as ws:
        await assert_refused(ws, "forbidden", 4403)


async def test_allowed_users_get_in_and_tokens_stay_out_of_the_logs(
    servers: tuple[UvicornServer, UvicornServer], make_token: TokenFactory
) -> None:
    header_token, subprotocol_token, query_token = make_token("u12"), make_token("admin"), make_token("u12")
    async with (
        connect_dream(servers[0], 12, header_token, "header") as by_header,
        connect_dream(servers[0], 12, subprotocol_token, "subprotocol") as by_subprotocol,
        connect_dream(servers[0], 12, query_token, "query") as by_query,
    ):
        await established(by_header, 12)
        await established(by_subprotocol, 12)
        await established(by_query, 12)
    log = servers[0].log_text()
    assert "WebSocket /dreams/12" in log  # the access log is on, and still holds no token
    assert header_token not in log and subprotocol_token not in log and query_token not in log
    assert "/dreams/12?token=[redacted]" in log
