"""The sync producer in a plain Python process: validation happens before anything is published."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from tests.support.producers import producer_call, run_producer
from tests.support.redis import RedisServer
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer

from .client import connect_dream, established, recv_json, send_json

pytestmark = pytest.mark.integration


@pytest.mark.anyio
async def test_a_bad_status_raises_value_error_and_publishes_nothing(
    servers: tuple[UvicornServer, UvicornServer], backend_url: str, make_token: TokenFactory
) -> None:
    server_a, _ = servers
    async with connect_dream(server_a, 7, make_token("u7")) as ws:
        await established(ws, 7)
        calls = [
            producer_call(7, ["https://cdn.example/bad.png"], "done", "not a status"),
            producer_call(7, ["https://cdn.example/bad.png"], "COMPLETED", "statuses are lower case"),
            producer_call(7, ["https://cdn.example/good.png"], "completed", "the valid one"),
        ]
        since = time.time()
        outcomes = await asyncio.to_thread(run_producer, backend_url, calls)
        assert [outcome.get("error") for outcome in outcomes] == ["ValueError", "ValueError", None]
        assert "status must be one of" in outcomes[0]["message"]
        assert outcomes[2] == {"ok": True}

        # Nothing was published for the bad calls: the next message is the valid update.
        update = await recv_json(ws)
        assert update["type"] == "image_update" and update["status"] == "completed", update
        assert update["images"] == ["https://cdn.example/good.png"] and update["message"] == "the valid one"
        assert since <= update["timestamp"] <= time.time()
        # ... and nothing was recorded either.
        await send_json(ws, {"type": "request_status"})
        assert await recv_json(ws) == update


@pytest.mark.anyio
async def test_a_bad_status_alone_records_no_state(
    servers: tuple[UvicornServer, UvicornServer], backend_url: str, make_token: TokenFactory
) -> None:
    outcomes = await asyncio.to_thread(run_producer, backend_url, [producer_call(13, status="uploading")])
    assert outcomes[0]["error"] == "ValueError"
    async with connect_dream(servers[1], 13, make_token("u13")) as ws:
        await established(ws, 13)
        await send_json(ws, {"type": "request_status"})
        assert (await recv_json(ws))["code"] == "status_unknown"


def test_one_producer_process_keeps_its_backend_connections_for_all_calls(redis_server: RedisServer) -> None:
    """Five calls open no more Redis connections than one call: the process reuses its connection."""
    with redis.Redis.from_url(redis_server.url) as admin:

        def connections_for(calls: int) -> int:
            before = int(admin.info("stats")["total_connections_received"])
            outcomes = run_producer(redis_server.url, [producer_call(15, status="processing")] * calls)
            assert outcomes == [{"ok": True}] * calls
            return int(admin.info("stats")["total_connections_received"]) - before

        one, five = connections_for(1), connections_for(5)
    assert one >= 1
    assert five == one, (one, five)
