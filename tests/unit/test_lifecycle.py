"""Every task a connection starts ends with it, whichever side closes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from starlette_dream_ws import DreamWebSocketApp, asend_image_update
from starlette_dream_ws.testing import ConsumerTestClient

pytestmark = pytest.mark.anyio

MakeApp = Callable[..., DreamWebSocketApp]


def _library_tasks() -> set[asyncio.Task[object]]:
    # Tasks whose code lives in the package: readers, pumps, heartbeat.
    def ours(task: asyncio.Task[object]) -> bool:
        code = getattr(task.get_coro(), "cr_code", None)
        return code is not None and "starlette_dream_ws" in code.co_filename

    return {task for task in asyncio.all_tasks() if ours(task)}


async def test_200_connect_disconnect_cycles_leave_no_task(make_app: MakeApp) -> None:
    app = make_app(heartbeat_interval=0.05, heartbeat_timeout=5)
    async with ConsumerTestClient(app) as client:
        baseline = _library_tasks()  # the layer's reader and its subscriber of new groups
        assert len(baseline) == 2
        for cycle in range(200):
            async with client.connect(f"/dreams/{cycle % 7 + 1}") as ws:
                await ws.receive_json()
                if cycle % 3 == 0:
                    # An update in flight while closing: its pump task must end too.
                    await asend_image_update(cycle % 7 + 1, status="processing")
                    await ws.receive_until("image_update")
        async with client.connect("/dreams/1") as ws:
            # A round trip after the last close lets the server finish its teardown.
            await ws.receive_json()
        await _settled(app)
        assert _library_tasks() == baseline
        assert len(app.context.consumers) == 0
        assert len(app.heartbeat) == 0
        assert all(app.layer.local_members(f"dream_images_{n}") == 0 for n in range(1, 8))


async def _settled(app: DreamWebSocketApp) -> None:
    # Teardown runs in the server-side task after the client is gone; wait for it by event.
    if app.context.consumers:
        drained = app.context.drained = asyncio.Event()
        await asyncio.wait_for(drained.wait(), 5)
        app.context.drained = None


async def test_server_side_close_also_cleans_up(make_app: MakeApp) -> None:
    app = make_app(heartbeat_interval=0.05, heartbeat_timeout=0.15)
    async with ConsumerTestClient(app) as client:
        baseline = _library_tasks()
        for _ in range(10):
            async with client.connect("/dreams/2") as ws:
                await ws.receive_json()
                assert (await ws.expect_close())[0] == 4408
        await _settled(app)
        assert _library_tasks() == baseline
        assert app.layer.local_members("dream_images_2") == 0


async def test_app_close_sends_1001_and_stops_everything(make_app: MakeApp) -> None:
    app = make_app()
    async with ConsumerTestClient(app) as client:
        async with client.connect("/dreams/1") as one, client.connect("/dreams/2") as two:
            await one.receive_json()
            await two.receive_json()
            await app.close()
            assert (await one.expect_close())[0] == 1001
            assert (await two.expect_close())[0] == 1001
        assert _library_tasks() == set()
        assert not app.layer.connected


async def test_connections_arriving_during_a_shutdown_are_turned_away(make_app: Callable[..., Any]) -> None:
    # A client that reconnects at once while the server stops must not keep it waiting.
    app = make_app()
    async with ConsumerTestClient(app) as client:
        async with client.connect("/dreams/1") as ws:
            assert (await ws.receive_json())["type"] == "connection_established"
            app.begin_shutdown()
            assert (await ws.expect_close())[0] == 1001
        async with client.connect("/dreams/1") as late:
            assert (await late.expect_close())[0] == 1001
        stream = await client.http.get(f"/dreams/1/events?token={client.token()}")
        assert stream.status_code == 503
    # After the shutdown, the app starts again on the next connection (tests, reloads).
    async with ConsumerTestClient(app) as client, client.connect("/dreams/1") as ws:
        assert (await ws.receive_json())["type"] == "connection_established"
