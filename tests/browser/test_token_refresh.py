"""`dream-ws.js` renews the token of an open connection (`refresh_token`) before it expires.

The page server mints tokens that live a few seconds (the `token_lifetime` cookie of
`page_app.py`), and checks every connection's expiry often (a heartbeat of 0.5 s ticks every
0.05 s): a connection still open several lifetimes later has been renewed in place, and one whose
renewal fails is closed with 4401 by the server. The scenarios run in the page (see
`test_client.py`); their clock is the server's, both on this machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.support.browser import PRELUDE
from tests.support.browser import run_in_page as run
from tests.support.producers import producer_call, run_producer

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.support.uvicorn import ServerFactory

pytestmark = pytest.mark.browser

#: The expiry check runs every tenth of an interval (`Heartbeat.tick`).
FAST_HEARTBEAT = {"DREAM_WS_HEARTBEAT_INTERVAL": "0.5"}

#: Defines `getToken()`, which fetches a token from `/demo-token` and records, in `tokens`, the
#: `exp` of each one (ms) and when it was handed out; it throws while `tokens.failing` is set.
GET_TOKEN = """
const tokens = [];
tokens.failing = false;
const getToken = async () => {
  if (tokens.failing) throw new Error('token endpoint down');
  const token = (await (await fetch('/demo-token', { cache: 'no-store' })).json()).token;
  const { exp } = JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')));
  tokens.push({ at: Date.now(), exp: exp * 1000 });
  return token;
};
"""


def short_lived_tokens(page: Page, base_url: str, seconds: int) -> None:
    """From now on, `/demo-token` mints tokens that expire within `seconds` (`exp` is whole seconds)."""
    page.context.add_cookies([{"name": "token_lifetime", "value": str(seconds), "url": base_url}])


def count_handshakes(page: Page) -> list[str]:
    handshakes: list[str] = []
    page.on("websocket", lambda ws: handshakes.append(ws.url))
    return handshakes


def test_a_connection_outlives_its_short_lived_tokens(page: Page, start_server: ServerFactory, redis_url: str) -> None:
    server = start_server(env=FAST_HEARTBEAT)
    short_lived_tokens(page, server.base_url, 3)
    handshakes = count_handshakes(page)
    result: dict[str, Any] = run(
        page,
        server.base_url,
        GET_TOKEN
        + """
        const socket = window.socket = new DreamSocket({ dreamId: 1, getToken });
        const states = [];
        const errors = [];
        const refreshed = [];
        socket.on('state', ({ state, code }) => states.push([state, code ?? null]));
        socket.on('error', (error) => errors.push(error.code));
        socket.on('token_refreshed', (message) => refreshed.push({ at: Date.now(), exp: message.expires_at * 1000 }));
        await until(() => socket.state === 'open', 5000, 'open');
        // What is tested is time passing: two lifetimes and more past the first token's expiry.
        const end = tokens[0].exp + 6000;
        await until(() => Date.now() > end, end - Date.now() + 2000, 'the end');
        return { states, errors, tokens, refreshed, state: socket.state };
        """,
    )
    assert result["state"] == "open"
    assert result["states"] == [["connecting", None], ["open", None]]
    assert result["errors"] == []  # token_expired above all
    assert len(handshakes) == 1
    tokens, refreshed = result["tokens"], result["refreshed"]
    # The first token served the handshake; every other one was a renewal the server accepted
    # (the last one may still be on its way at the end).
    assert len(refreshed) >= 3 and len(tokens) - len(refreshed) in (1, 2), result
    for before, renewed, answer in zip(tokens, tokens[1:], refreshed, strict=False):
        assert answer["exp"] == renewed["exp"]
        # Renewed before the token in use expired, yet not at once: in its last quarter or so.
        lifetime = before["exp"] - before["at"]
        # (ms clocks: the answer may come within the same millisecond)
        assert before["at"] + lifetime / 2 < renewed["at"] <= answer["at"] < before["exp"], result

    outcomes = run_producer(redis_url, [producer_call(1, [], "processing", "still listening")])
    assert outcomes == [{"ok": True}], outcomes
    update = page.evaluate(
        f"async () => {{ {PRELUDE}\n"
        """
        await until(() => socket.lastUpdate?.message === 'still listening', 5000, 'the update');
        return { update: socket.lastUpdate, state: socket.state };
        }"""
    )
    assert update["state"] == "open"
    assert update["update"]["status"] == "processing"
    assert len(handshakes) == 1


def test_when_renewing_fails_the_server_closes_4401_and_the_client_reconnects(
    page: Page, start_server: ServerFactory
) -> None:
    """The renewal is retried until the expiry; then the server's 4401 leads to a reconnect with
    a token from getToken(), retried with backoff while getToken() fails, as after any 4401."""
    server = start_server(env=FAST_HEARTBEAT)
    short_lived_tokens(page, server.base_url, 3)
    handshakes = count_handshakes(page)
    result: dict[str, Any] = run(
        page,
        server.base_url,
        GET_TOKEN
        + """
        const socket = new DreamSocket({ dreamId: 1, getToken, backoffBase: 200, backoffMax: 400 });
        const states = [];
        const errors = [];
        socket.on('state', ({ state, code }) => states.push({ at: Date.now(), state, code: code ?? null }));
        socket.on('error', (error) => errors.push({ at: Date.now(), code: error.code }));
        await until(() => socket.state === 'open', 5000, 'open');
        tokens.failing = true;
        await until(() => states.some(({ code }) => code === 4401), 5000, 'the close');
        // A reconnect attempt has failed too (the renewal's failures came before token_expired).
        const expired = () => errors.some(({ code }) => code === 'token_expired');
        await until(() => expired() && errors.at(-1).code === 'token_unavailable', 2000, 'a failed reconnect');
        tokens.failing = false;
        await until(() => socket.state === 'open', 5000, 'open again');
        socket.close();
        return { states, errors, tokens };
        """,
    )
    states, errors, tokens = result["states"], result["errors"], result["tokens"]
    expiry = tokens[0]["exp"]
    codes = [error["code"] for error in errors]
    expired = codes.index("token_expired")
    # Renewal attempts, all before the expiry; then the server's word; then reconnect attempts.
    assert expired >= 2, result  # the first attempt and at least one retry
    assert set(codes[:expired]) == {"token_unavailable"}, result
    assert all(error["at"] < expiry for error in errors[:expired]), result
    assert set(codes[expired + 1 :]) == {"token_unavailable"}, result
    changes = [(change["state"], change["code"]) for change in states]
    retries = [("reconnecting", None)] * (len(changes) - 5)  # getToken() failing, backing off
    assert retries, result
    opened, back = [("connecting", None), ("open", None)], [("open", None), ("closed", 1000)]
    assert changes == [*opened, ("reconnecting", 4401), *retries, *back], result
    assert states[2]["at"] >= expiry, result
    assert len(tokens) == 2  # the first, and the one of the reconnect
    assert len(handshakes) == 2


def test_close_cancels_the_renewal(page: Page, start_server: ServerFactory) -> None:
    server = start_server(env=FAST_HEARTBEAT)
    short_lived_tokens(page, server.base_url, 3)
    handshakes = count_handshakes(page)
    result: dict[str, Any] = run(
        page,
        server.base_url,
        GET_TOKEN
        + """
        let calls = 0;
        const counting = () => { calls += 1; return getToken(); };
        const socket = new DreamSocket({ dreamId: 1, getToken: counting });
        await until(() => socket.state === 'open', 5000, 'open');
        socket.close();
        // Past the time the renewal was due, and the expiry.
        const end = tokens[0].exp + 500;
        await until(() => Date.now() > end, end - Date.now() + 1000, 'the end');
        return { calls, state: socket.state };
        """,
    )
    assert result == {"calls": 1, "state": "closed"}
    assert len(handshakes) == 1
