"""`dream-ws.js` in a real browser, where a fake WebSocket cannot tell: what Chromium's own
`WebSocket` refuses to construct, and a page that gives up from inside a listener.

Each test loads the client from the page server (`/ws/dream-ws.js`) into a blank page of the same
origin and drives it with a script; the `page` fixture fails the test on any uncaught error or
unhandled rejection in the page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.support.browser import run_in_page
from tests.support.processes import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.support.uvicorn import ServerFactory

pytestmark = pytest.mark.browser


def run(page: Page, base_url: str, scenario: str, arg: Any = None) -> Any:
    return run_in_page(page, base_url, scenario, arg)


def test_a_token_with_surrounding_whitespace_connects(page: Page, start_server: ServerFactory) -> None:
    """A token read with `response.text()` often ends with a newline, which no subprotocol may hold."""
    server = start_server()
    result = run(
        page,
        server.base_url,
        """
        const token = (await (await fetch('/demo-token')).json()).token;
        const socket = new DreamSocket({ dreamId: 1, getToken: async () => ` ${token}\\n` });
        await until(() => socket.state === 'open', 5000, 'open');
        socket.close();
        return socket.state;
        """,
    )
    assert result == "closed"


def test_a_token_no_websocket_can_carry_fails_auth_instead_of_hanging(page: Page, start_server: ServerFactory) -> None:
    """`new WebSocket` throws on such a subprotocol: once that left the client in `connecting` forever."""
    server = start_server()
    handshakes: list[str] = []
    page.on("websocket", lambda ws: handshakes.append(ws.url))
    result = run(
        page,
        server.base_url,
        """
        let calls = 0;
        const socket = new DreamSocket({ dreamId: 1, getToken: async () => { calls += 1; return 'not a token'; } });
        const states = [];
        const errors = [];
        socket.on('state', ({ state, code, error }) => states.push([state, code ?? null, error?.code ?? null]));
        socket.on('error', (error) => errors.push(error.code));
        await until(() => socket.state === 'auth_failed', 5000, 'auth_failed');
        await pause(300);  // nothing more happens
        return { states, errors, calls };
        """,
    )
    # As after a 4401 from the server: one more try with a fresh token, then auth_failed for good.
    assert result == {
        "states": [["connecting", None, None], ["reconnecting", 4401, None], ["auth_failed", 4401, "invalid_token"]],
        "errors": ["invalid_token", "invalid_token"],
        "calls": 2,
    }
    assert handshakes == []


def test_a_url_the_browser_refuses_is_reported_and_retried(page: Page, start_server: ServerFactory) -> None:
    server = start_server()
    result = run(
        page,
        server.base_url,
        """
        const socket = new DreamSocket({
          dreamId: 1, url: 'ftp://127.0.0.1/ws', token: 'a.b.c', backoffBase: 10, backoffMax: 20,
        });
        const errors = [];
        socket.on('error', (error) => errors.push(error));
        await until(() => errors.length >= 3, 5000, 'three attempts');
        const state = socket.state;
        socket.close();
        return { state, codes: [...new Set(errors.map((error) => error.code))], message: errors[0].message };
        """,
    )
    assert result["state"] == "reconnecting"
    assert result["codes"] == ["connect_failed"]
    assert "scheme" in result["message"], result


def test_close_from_a_listener_stops_every_retry(page: Page, start_server: ServerFactory) -> None:
    """A page that gives up from an `error` or `state` listener must not get a connection back."""
    server = start_server()
    result = run(
        page,
        server.base_url,
        """
        const counted = (getToken) => {
          const counting = async () => { counting.calls += 1; return getToken(); };
          counting.calls = 0;
          return counting;
        };
        // The token endpoint is down, and the page gives up on the first error.
        const failing = counted(() => { throw new Error('token endpoint down'); });
        const first = new DreamSocket({ dreamId: 1, getToken: failing, backoffBase: 10 });
        first.on('error', () => first.close());
        // The server is down, and the page gives up as soon as the client says it will retry.
        const fetching = counted(async () => (await (await fetch('/demo-token')).json()).token);
        const second = new DreamSocket({
          dreamId: 1, url: `ws://127.0.0.1:${arg}/ws`, getToken: fetching, backoffBase: 10,
        });
        second.on('state', ({ state }) => { if (state === 'reconnecting') second.close(); });
        await until(() => first.state === 'closed' && second.state === 'closed', 5000, 'both closed');
        await pause(300);  // 30 times the first backoff: any retry would have happened
        return { first: [first.state, failing.calls], second: [second.state, fetching.calls] };
        """,
        free_port(),  # nothing listens there
    )
    assert result == {"first": ["closed", 1], "second": ["closed", 1]}
