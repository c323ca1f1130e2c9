"""`request_status` answers from the latest state a producer process recorded in the backend."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.producers import producer_call, run_producer
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer

from .client import connect_dream, established, recv_json, send_json

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


async def test_request_status_returns_the_latest_update_on_either_server(
    servers: tuple[UvicornServer, UvicornServer], backend_url: str, make_token: TokenFactory
) -> None:
    server_a, server_b = servers
    async with (
        connect_dream(server_a, 7, make_token("u7"), "subprotocol") as on_a,
        connect_dream(server_b, 7, make_token("admin"), "query") as on_b,
    ):
        await established(on_a, 7)
        await established(on_b, 7)
        calls = [
            producer_call(7, None, "processing", "queued"),
            producer_call(7, ["https://cdn.example/7/final.png"], "completed", None),
        ]
        assert await asyncio.to_thread(run_producer, backend_url, calls) == [{"ok": True}] * 2
        pushed = [await recv_json(on_a) for _ in calls]
        assert pushed == [await recv_json(on_b) for _ in calls]
        latest = pushed[-1]
        assert latest["status"] == "completed"

        # Without and with the (own) dream id, as an int and as a string.
        for ws, request in (
            (on_a, {"type": "request_status"}),
            (on_b, {"type": "request_status", "dream_id": 7}),
            (on_a, {"type": "request_status", "dream_id": "7"}),
        ):
            await send_json(ws, request)
            assert await recv_json(ws) == latest  # the very message pushed, timestamp and all

        # Another dream's status is refused, and the connection stays usable.
        await send_json(on_b, {"type": "request_status", "dream_id": 8})
        refused = await recv_json(on_b)
        assert refused["type"] == "error" and refused["code"] == "forbidden", refused
        assert isinstance(refused["message"], str) and refused["message"]
        await send_json(on_b, {"type": "ping", "timestamp": 12.5})
        assert await recv_json(on_b) == {"type": "pong", "timestamp": 12.5}


async def test_request_status_of_a_dream_without_updates_is_status_unknown(
    servers: tuple[UvicornServer, UvicornServer], backend_url: str, make_token: TokenFactory
) -> None:
    # Dream 7 has a state, dream 9 has none: the answer must not leak another dream's state.
    assert await asyncio.to_thread(run_producer, backend_url, [producer_call(7, status="failed")]) == [{"ok": True}]
    for server in servers:
        async with connect_dream(server, 9, make_token("u9"), "header") as ws:
            await established(ws, 9)
            await send_json(ws, {"type": "request_status"})
            unknown = await recv_json(ws)
            assert unknown["type"] == "error" and unknown["code"] == "status_unknown", unknown
            await send_json(ws, {"type": "request_status", "dream_id": 7})
            assert (await recv_json(ws))["code"] == "forbidden"


async def test_the_latest_state_is_shared_with_a_client_that_connects_later(
    servers: tuple[UvicornServer, UvicornServer], backend_url: str, make_token: TokenFactory
) -> None:
    """Published while nobody watched: a late joiner on the other server can still catch up."""
    _, server_b = servers
    update = producer_call(11, ["https://cdn.example/11.png"], "delete_processing", "removing")
    assert await asyncio.to_thread(run_producer, backend_url, [update]) == [{"ok": True}]
    async with connect_dream(server_b, 11, make_token("u11")) as ws:
        await established(ws, 11)
        await send_json(ws, {"type": "request_status", "dream_id": 11})
        state = await recv_json(ws)
    assert state["type"] == "image_update" and state["dream_id"] == 11
    assert (state["status"], state["images"], state["message"]) == (
        "delete_processing",
        update["image_urls"],
        "removing",
    )
    assert isinstance(state["timestamp"], float)
