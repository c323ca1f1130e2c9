"""Mounted in a parent app whose lifespan does not run it, the dream app connects on first use."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.support.processes import workdir
from tests.support.producers import producer_call, run_producer
from tests.support.redis import RedisServer
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer, server_env, serving

from .client import connect_dream, established, recv_json

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.fixture(scope="module")
def mounted_server(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    server = UvicornServer(
        server_env(redis_server.url), "served_app:mounted", mount="/ws", workdir=workdir(tmp_path_factory, "mounted")
    )
    with serving(server):
        yield server


async def test_mounted_app_connects_lazily_and_then_serves(
    mounted_server: UvicornServer, redis_server: RedisServer, make_token: TokenFactory
) -> None:
    # Nothing has used the layer yet. Today /health says 503 until the first WebSocket makes the
    # layer connect (which is why readiness polling takes any HTTP answer); the status code and
    # the body must agree either way.
    before = await asyncio.to_thread(mounted_server.health)
    assert before is not None
    assert before[0] == (200 if before[1]["backend_connected"] else 503), before

    async with connect_dream(mounted_server, 14, make_token("u14"), "subprotocol") as ws:
        assert ws.request is not None and ws.request.path == "/ws/dreams/14"
        await established(ws, 14)
        after = await asyncio.to_thread(mounted_server.health)
        assert after is not None and after[0] == 200, after
        assert after[1] == {
            "status": "ok",
            "backend_connected": True,
            "connections": 1,
            "backend_reconnects": 0,
            "slow_closed": 0,
            "dropped": 0,
        }

        update = producer_call(14, ["https://cdn.example/14.png"], "completed", None)
        since = time.time()
        assert await asyncio.to_thread(run_producer, redis_server.url, [update]) == [{"ok": True}]
        received = await recv_json(ws)
        assert received["type"] == "image_update" and received["dream_id"] == 14
        assert received["images"] == ["https://cdn.example/14.png"]
        assert since <= received["timestamp"] <= time.time()
