"""Resume in a real browser: the client keeps its last position, resumes from it after the
server is killed and restarted (WebSocket with `since`, SSE with `Last-Event-ID`), never shows
an older status, and falls back to SSE when WebSocket cannot connect."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.support.browser import run_in_page
from tests.support.producers import producer_call, run_producer

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.support.uvicorn import ServerFactory

pytestmark = pytest.mark.browser

#: Starts a client on dream 1 (`arg.options` added) that records, in `window.seen`, every update it
#: applies (its seq) and every `open` (its transport and `recovered`).
WATCH = """
const token = async () => (await (await fetch('/demo-token')).json()).token;
window.seen = { seqs: [], opens: [] };
const socket = new DreamSocket({ dreamId: 1, getToken: token, backoffBase: 100, backoffMax: 500, ...arg.options });
socket.on('image_update', (u) => window.seen.seqs.push(u.seq));
socket.on('state', ({ state, recovered, transport }) => {
  if (state === 'open') window.seen.opens.push({ recovered: recovered ?? null, transport });
});
window.socket = socket;
await until(() => socket.state === 'open', 10000, 'open');
return window.seen;
"""


def publish(redis_url: str, first: int, last: int) -> None:
    calls = [producer_call(1, [], "processing", f"step {n}") for n in range(first, last + 1)]
    assert run_producer(redis_url, calls) == [{"ok": True}] * len(calls)


def wait_seen(page: Page, count: int) -> dict[str, Any]:
    page.wait_for_function(f"window.seen.seqs.length >= {count}", timeout=15_000)
    seen: dict[str, Any] = page.evaluate("window.seen")
    return seen


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_the_client_resumes_after_a_server_restart_with_every_update_once(
    page: Page, start_server: ServerFactory, redis_url: str, transport: str
) -> None:
    server = start_server()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.on("websocket", lambda ws: requests.append(ws.url))
    run_in_page(page, server.base_url, WATCH, {"options": {"transport": transport}})
    publish(redis_url, 1, 3)
    assert wait_seen(page, 3)["seqs"] == [1, 2, 3]

    server.kill()  # SIGKILL: as after a crash
    publish(redis_url, 4, 6)  # while the page is away
    server.start()  # same port
    page.wait_for_function("window.seen.opens.length >= 2", timeout=20_000)
    seen = wait_seen(page, 6)
    publish(redis_url, 7, 7)
    seen = wait_seen(page, 7)
    assert seen["seqs"] == [1, 2, 3, 4, 5, 6, 7], "every update exactly once, in order"
    assert seen["opens"][0] == {"recovered": None, "transport": transport}
    assert seen["opens"][-1] == {"recovered": True, "transport": transport}
    # It resumed from the position it had applied, in the URL (WebSocket) or the header (SSE).
    if transport == "websocket":
        assert any("since=" in url and url.endswith("%3A3") for url in requests if url.startswith("ws")), requests


def test_an_older_status_is_never_shown_over_a_newer_one(
    page: Page, start_server: ServerFactory, redis_url: str
) -> None:
    """Status answers race live updates after every connect; the page applies only newer ones."""
    server = start_server()
    run_in_page(page, server.base_url, WATCH, {"options": {}})
    calls = [{**producer_call(1, [], "processing", f"step {n}"), "pause_before": 0.005} for n in range(1, 61)]
    # Ask for the status again and again while the updates stream in.
    page.evaluate("window.asking = setInterval(() => window.socket.requestStatus(), 2)")
    assert run_producer(redis_url, calls) == [{"ok": True}] * 60
    page.wait_for_function("window.seen.seqs.at(-1) === 60", timeout=15_000)
    page.evaluate("clearInterval(window.asking)")
    seqs = page.evaluate("window.seen.seqs")
    assert seqs == sorted(set(seqs)) and seqs[-1] == 60


def test_a_blocked_websocket_falls_back_to_server_sent_events(
    page: Page, start_server: ServerFactory, redis_url: str
) -> None:
    server = start_server()
    blocked = """
    class Blocked {  // what a proxy that drops upgrades looks like: closed before it opens
      constructor() { setTimeout(() => this.onclose?.({ code: 1006, reason: '' }), 5); }
      close() {}
    }
    """
    seen = run_in_page(
        page,
        server.base_url,
        blocked + WATCH.replace("...arg.options", "WebSocket: Blocked, sseAfter: 2"),
        {"options": {}},
    )
    assert seen["opens"] == [{"recovered": None, "transport": "sse"}]
    publish(redis_url, 1, 2)
    assert wait_seen(page, 2)["seqs"] == [1, 2]


def test_a_refused_event_stream_ends_in_auth_failed_not_in_endless_retries(
    page: Page, start_server: ServerFactory
) -> None:
    """EventSource hides a refusal's status: the client asks for it once and stops, as after 4401."""
    server = start_server()
    streams: list[str] = []
    page.on("request", lambda request: streams.append(request.url) if "/events" in request.url else None)
    states = run_in_page(
        page,
        server.base_url,
        """
        const states = [];
        const socket = new DreamSocket({ dreamId: 1, token: 'not.a.token', transport: 'sse', backoffBase: 50 });
        socket.on('state', ({ state, code }) => states.push([state, code ?? null]));
        await until(() => states.some(([state]) => state === 'auth_failed'), 10000, 'auth_failed');
        return states;
        """,
    )
    assert states[-1] == ["auth_failed", 4401], states
    # The stream and the one request that asked why: no retry loop.
    assert len(streams) == 2, streams
