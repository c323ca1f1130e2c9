"""The integration examples, run as documented: a real uvicorn process each, real clients.

* `examples/video_renders.py`: FastAPI, a second job kind with UUID ids and percent progress,
  signed in with the app's own cookie through a FastAPI dependency (no JWT secret set);
* `examples/session_auth.py`: dreams watched by users of Starlette's `SessionMiddleware`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.support.processes import workdir
from tests.support.uvicorn import UvicornServer, serving

from .client import expect_close, recv_json, send_json

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0


def example_server(app: str, mount: str, tmp_path_factory: pytest.TempPathFactory, **env: str) -> UvicornServer:
    # No DREAM_WS_JWT_SECRET: these apps authenticate with their own sessions.
    return UvicornServer(env, app=app, mount=mount, app_dir=ROOT, workdir=workdir(tmp_path_factory, app), cwd=ROOT)


def live(server: UvicornServer, path: str, cookies: httpx.Cookies | None = None) -> connect:
    header = "; ".join(f"{name}={value}" for name, value in (cookies or {}).items())
    return connect(
        server.ws_url(path),
        additional_headers={"Cookie": header} if header else None,
        open_timeout=5,
        close_timeout=2,
        ping_interval=None,
    )


@contextlib.asynccontextmanager
async def signed_in(server: UvicornServer, name: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client holding `name`'s session cookie."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=TIMEOUT) as client:
        response = await client.post("/login", json={"name": name})
        assert response.status_code == 200, response.text
        assert "session" in client.cookies
        yield client


async def events_until(ws: ClientConnection, kind: str, done: Any) -> list[dict[str, Any]]:
    """Messages of type `kind` until `done(message)` holds (pings skipped)."""
    seen: list[dict[str, Any]] = []
    while True:
        message = await recv_json(ws, TIMEOUT)
        if message["type"] == kind:
            seen.append(message)
            if done(message):
                return seen


# -- video renders --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    # A step long enough for a client to connect before the first update, in the common case;
    # the assertions hold either way (a late client sees a suffix of the walk).
    server = example_server("examples.video_renders:app", "/live", tmp_path_factory, RENDER_STEP_DELAY="0.3")
    with serving(server):
        yield server


async def test_a_render_is_watched_with_its_uuid_and_percent_progress(renders: UvicornServer) -> None:
    async with signed_in(renders, "ada") as http:
        render_id = (await http.post("/renders")).json()["render_id"]
        async with live(renders, f"/renders/{render_id}", http.cookies) as ws:
            greeting = await recv_json(ws, TIMEOUT)
            assert greeting["type"] == "connection_established"
            assert greeting["render_id"] == render_id  # the UUID's text, as it came in the path
            updates = await events_until(ws, "render_update", lambda m: m["percent"] == 100)
            percents = [update["percent"] for update in updates]
            assert percents == sorted(set(percents)) and percents[-1] == 100
            assert {update["render_id"] for update in updates} == {render_id}
            assert updates[-1]["state"] == "done"
            seqs = [update["seq"] for update in updates]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            await send_json(ws, {"type": "request_status"})
            latest = await events_until(ws, "render_update", lambda m: True)
            assert latest[0]["percent"] == 100 and latest[0]["seq"] == seqs[-1]
        # The same over Server-Sent Events, with the same cookie: the latest state on resume.
        stream_url = f"/live/renders/{render_id}/events"
        async with http.stream("GET", stream_url, params={"since": f"{updates[-1]['epoch']}:0"}) as stream:
            assert stream.status_code == 200
            data = [json.loads(line[5:]) async for line in _sse_data(stream, until_percent=100)]
        assert data[0]["type"] == "connection_established" and data[0]["recovered"] is True
        assert [event["percent"] for event in data[1:]] == [0, 25, 50, 75, 100]


async def _sse_data(stream: httpx.Response, until_percent: int) -> Any:
    async with asyncio.timeout(TIMEOUT):
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                yield line
                if json.loads(line[5:]).get("percent") == until_percent:
                    return


async def test_renders_of_others_and_signed_out_users_are_refused(renders: UvicornServer) -> None:
    async with signed_in(renders, "ada") as ada, signed_in(renders, "bob") as bob:
        render_id = (await ada.post("/renders")).json()["render_id"]
        async with live(renders, f"/renders/{render_id}", bob.cookies) as ws:
            assert (await recv_json(ws))["code"] == "forbidden"
            assert await expect_close(ws) == 4403
    async with live(renders, f"/renders/{render_id}") as ws:
        assert (await recv_json(ws))["code"] == "unauthenticated"
        assert await expect_close(ws) == 4401
    async with httpx.AsyncClient(base_url=renders.base_url) as anonymous:
        assert (await anonymous.post("/renders")).status_code == 401
        # Not a UUID: no route (the server refuses the handshake), not a crash.
        with pytest.raises(InvalidStatus) as refused:
            async with live(renders, "/renders/not-a-uuid"):
                pass
        assert refused.value.response.status_code in (403, 404)
    assert "Traceback" not in renders.log_text()


async def test_an_unknown_render_is_refused_not_crashed(renders: UvicornServer) -> None:
    async with signed_in(renders, "ada") as ada, live(renders, f"/renders/{uuid.uuid4()}", ada.cookies) as ws:
        assert (await recv_json(ws))["code"] == "forbidden"
        assert await expect_close(ws) == 4403


# -- session auth ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    server = example_server("examples.session_auth:app", "/ws", tmp_path_factory, SESSION_SECRET="test-secret")
    with serving(server):
        yield server


async def test_a_session_user_watches_their_dream(sessions: UvicornServer) -> None:
    async with signed_in(sessions, "ada") as http, live(sessions, "/dreams/1", http.cookies) as ws:
        greeting = await recv_json(ws)
        assert greeting["type"] == "connection_established" and greeting["dream_id"] == 1
        assert (await http.post("/dreams/1/walk")).status_code == 200
        updates = await events_until(ws, "image_update", lambda m: m["status"] == "completed")
        assert [(u["status"], u.get("progress")) for u in updates] == [("processing", 50), ("completed", 100)]


async def test_without_a_session_or_for_another_users_dream_it_is_refused(sessions: UvicornServer) -> None:
    async with live(sessions, "/dreams/1") as ws:
        assert (await recv_json(ws))["code"] == "unauthenticated"
        assert await expect_close(ws) == 4401
    async with signed_in(sessions, "ada") as http, live(sessions, "/dreams/3", http.cookies) as ws:
        assert (await recv_json(ws))["code"] == "forbidden"
        assert await expect_close(ws) == 4403
        # A session user has no token to refresh: a clear error, the connection stays.
    async with signed_in(sessions, "ada") as http, live(sessions, "/dreams/2", http.cookies) as ws:
        await recv_json(ws)
        await send_json(ws, {"type": "refresh_token", "token": "x"})
        assert (await recv_json(ws))["code"] == "unsupported"
        await send_json(ws, {"type": "ping", "timestamp": 1})
        assert (await recv_json(ws))["type"] == "pong"
