"""The component mounted under Starlette and FastAPI, standalone, and configured by env."""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from fastapi import FastAPI
from httpx_ws import aconnect_ws
from httpx_ws.transport import ASGIWebSocketTransport
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from starlette_dream_ws import DreamWebSocketApp, allow_any_authenticated_user, asend_image_update, send_image_update
from starlette_dream_ws.groups import shared
from starlette_dream_ws.testing import ConsumerTestClient
from tests.support.tokens import UNIT_SECRET as SECRET

pytestmark = pytest.mark.anyio

MakeApp = Callable[..., DreamWebSocketApp]


def _trigger(request: Request) -> JSONResponse:
    # A sync endpoint: Starlette runs it in a worker thread, as many integrators' views are.
    dream_id = int(request.path_params["dream_id"])
    send_image_update(dream_id, [f"https://cdn/{dream_id}.png"], "completed", "from a sync view")
    return JSONResponse({"sent": dream_id})


@contextlib.asynccontextmanager
async def _client(parent: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with ASGIWebSocketTransport(parent) as transport:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


async def _watch_and_trigger(parent: Any, token: str) -> dict[str, Any]:
    async with _client(parent) as http:
        async with aconnect_ws(f"/ws/dreams/4?token={token}", http) as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "connection_established"
            response = await http.post("/trigger/4")
            assert response.json() == {"sent": 4}
            update: dict[str, Any] = await ws.receive_json(timeout=5)
    return update


def _token() -> str:
    return jwt.encode({"sub": "u", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


async def test_mounted_under_starlette_without_lifespan_connects_lazily(make_app: MakeApp) -> None:
    dream_ws = make_app()
    parent = Starlette(routes=[Mount("/ws", dream_ws), Route("/trigger/{dream_id:int}", _trigger, methods=["POST"])])
    assert not dream_ws.layer.connected
    update = await _watch_and_trigger(parent, _token())
    assert (update["type"], update["dream_id"], update["message"]) == ("image_update", 4, "from a sync view")
    assert dream_ws.layer.connected
    await dream_ws.close()


async def test_mounted_under_starlette_with_the_lifespan_helper(make_app: MakeApp) -> None:
    dream_ws = make_app()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with dream_ws.lifespan():
            yield

    parent = Starlette(
        routes=[Mount("/ws", dream_ws), Route("/trigger/{dream_id:int}", _trigger, methods=["POST"])],
        lifespan=lifespan,
    )
    async with parent.router.lifespan_context(parent):
        assert dream_ws.layer.connected  # connected at startup, before any client
        update = await _watch_and_trigger(parent, _token())
        assert update["status"] == "completed"
    assert not dream_ws.layer.connected  # and disconnected at shutdown


async def test_mounted_under_fastapi(make_app: MakeApp) -> None:
    dream_ws = make_app()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with dream_ws.lifespan():
            yield

    parent = FastAPI(lifespan=lifespan)

    @parent.post("/trigger/{dream_id}")
    def trigger(dream_id: int) -> dict[str, int]:
        send_image_update(dream_id, [f"https://cdn/{dream_id}.png"], "completed", "from a sync view")
        return {"sent": dream_id}

    parent.mount("/ws", dream_ws)
    async with parent.router.lifespan_context(parent):
        update = await _watch_and_trigger(parent, _token())
    assert (update["dream_id"], update["images"]) == (4, ["https://cdn/4.png"])


async def test_standalone_app_runs_its_own_lifespan(make_app: MakeApp) -> None:
    dream_ws = make_app()
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    server = asyncio.create_task(dream_ws(scope, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    assert (await asyncio.wait_for(from_app.get(), 5))["type"] == "lifespan.startup.complete"
    assert dream_ws.layer.connected
    await to_app.put({"type": "lifespan.shutdown"})
    assert (await asyncio.wait_for(from_app.get(), 5))["type"] == "lifespan.shutdown.complete"
    await asyncio.wait_for(server, 5)
    assert not dream_ws.layer.connected


async def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAM_WS_JWT_SECRET", SECRET)
    monkeypatch.setenv("DREAM_WS_HEARTBEAT_INTERVAL", "7.5")
    monkeypatch.setenv("DREAM_WS_BROADCAST_URL", "memory://")
    dream_ws = DreamWebSocketApp(authorize=allow_any_authenticated_user)
    assert dream_ws.settings.heartbeat_interval == 7.5
    assert dream_ws.settings.effective_heartbeat_timeout == 15.0
    # Keywords win over the environment.
    assert (
        DreamWebSocketApp(authorize=allow_any_authenticated_user, heartbeat_interval=3).settings.heartbeat_interval == 3
    )
    async with ConsumerTestClient(dream_ws) as client:
        async with client.connect("/dreams/1") as ws:
            assert (await ws.receive_json())["heartbeat_interval"] == 7.5


async def test_client_script_and_health_are_served(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client:
        script = await client.http.get("/dream-ws.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        health = await client.http.get("/health")
        assert health.status_code == 200
        assert health.json()["backend_connected"] is True


async def test_sync_producer_refuses_inside_the_event_loop_thread(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()):
        with pytest.raises(RuntimeError, match="asend_image_update"):
            send_image_update(1, status="processing")


def test_sync_producer_on_memory_without_an_app_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A process where no app was ever made (a Celery worker left on the default URL).
    monkeypatch.setattr(shared, "_declared", weakref.WeakSet())
    monkeypatch.setenv("DREAM_WS_BROADCAST_URL", "memory://")
    with pytest.raises(RuntimeError, match="DREAM_WS_BROADCAST_URL"):
        send_image_update(1, status="processing")


async def test_async_producer_on_memory_without_an_app_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Publishing into a memory backend that no connection listens to would lose the update silently.
    monkeypatch.setattr(shared, "_declared", weakref.WeakSet())
    monkeypatch.setenv("DREAM_WS_BROADCAST_URL", "memory://")
    with pytest.raises(RuntimeError, match="DREAM_WS_BROADCAST_URL"):
        await asend_image_update(1, status="processing")


async def test_sync_producer_from_a_worker_thread_reaches_the_app(make_app: MakeApp) -> None:
    async with ConsumerTestClient(make_app()) as client:
        async with client.connect("/dreams/2") as ws:
            await ws.receive_json()
            await asyncio.to_thread(send_image_update, 2, ["t.png"], "delete_processing")
            update = await ws.receive_json()
    assert (update["dream_id"], update["status"]) == (2, "delete_processing")
