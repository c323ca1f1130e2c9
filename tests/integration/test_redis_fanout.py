"""Updates from a producer process reach the clients of two servers through the backend, in order."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

from tests.support.producers import producer_call, run_producer
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer

from .client import SUBPROTOCOL, connect_dream, established, recv_json

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

UPDATES = [
    producer_call(7, None, "processing", None),
    producer_call(7, ["https://cdn.example/7/a.png"], "processing", "1 of 2"),
    producer_call(7, ["https://cdn.example/7/a.png", "https://cdn.example/7/b.png"], "completed", "done ✓"),
    producer_call(7, [], "delete_failed", None),
]


def assert_update(received: dict[str, Any], sent: dict[str, Any], since: float, until: float) -> None:
    """Every field of an `image_update` per PROTOCOL.md, and nothing else."""
    assert set(received) == {"type", "dream_id", "status", "images", "timestamp", "message", "seq", "epoch"}, received
    assert isinstance(received["seq"], int) and received["seq"] >= 1 and isinstance(received["epoch"], str)
    assert received["type"] == "image_update"
    assert received["dream_id"] == sent["dream_id"]
    assert received["status"] == sent["status"]
    assert received["images"] == (sent["image_urls"] or [])
    assert received["message"] == sent["message"]
    assert isinstance(received["timestamp"], float)
    # Set by the producer process, at the call.
    assert since <= received["timestamp"] <= until


async def test_updates_reach_every_client_of_the_dream_on_both_servers(
    servers: tuple[UvicornServer, UvicornServer], backend_url: str, make_token: TokenFactory
) -> None:
    server_a, server_b = servers
    async with AsyncExitStack() as stack:
        watchers = [
            await stack.enter_async_context(connect_dream(server_a, 7, make_token("u7"), "query")),
            await stack.enter_async_context(connect_dream(server_b, 7, make_token("admin"), "header")),
            await stack.enter_async_context(connect_dream(server_b, 7, make_token("u7"), "subprotocol")),
            await stack.enter_async_context(connect_dream(server_a, 7, make_token("admin"), "subprotocol")),
        ]
        other = await stack.enter_async_context(connect_dream(server_a, 8, make_token("u8"), "header"))

        assert [ws.subprotocol for ws in watchers] == [None, None, SUBPROTOCOL, SUBPROTOCOL]
        for ws in watchers:
            assert (await established(ws, 7))["heartbeat_interval"] == 30.0
        await established(other, 8)

        since = time.time()
        outcomes = await asyncio.to_thread(run_producer, backend_url, UPDATES)
        until = time.time()
        assert outcomes == [{"ok": True}] * len(UPDATES)

        seen = []
        for ws in watchers:
            received = [await recv_json(ws) for _ in UPDATES]
            for got, sent in zip(received, UPDATES, strict=True):
                assert_update(got, sent, since, until)
            stamps = [message["timestamp"] for message in received]
            assert stamps == sorted(stamps)
            seqs = [message["seq"] for message in received]
            assert seqs == list(range(seqs[0], seqs[0] + len(UPDATES)))
            seen.append(received)
        # The very same messages everywhere: one publish each, fanned out by each server.
        assert all(received == seen[0] for received in seen)

        # The dream 8 client got none of them: the next thing it receives is dream 8's update.
        update_8 = producer_call(8, ["https://cdn.example/8.png"], "failed", "no GPU")
        since = time.time()
        assert await asyncio.to_thread(run_producer, backend_url, [update_8]) == [{"ok": True}]
        assert_update(await recv_json(other), update_8, since, time.time())


async def test_a_client_that_leaves_does_not_stop_delivery_to_the_others(
    servers: tuple[UvicornServer, UvicornServer], backend_url: str, make_token: TokenFactory
) -> None:
    """The last local member leaving unsubscribes that server only; a rejoin subscribes again."""
    server_a, server_b = servers
    async with connect_dream(server_b, 7, make_token("u7")) as stays:
        await established(stays, 7)
        async with connect_dream(server_a, 7, make_token("u7")) as leaves:
            await established(leaves, 7)
        # `leaves` is closed; server A has no member of dream 7 now.
        async with connect_dream(server_a, 7, make_token("admin")) as rejoins:
            await established(rejoins, 7)
            update = producer_call(7, ["https://cdn.example/x.png"], "completed", None)
            since = time.time()
            assert await asyncio.to_thread(run_producer, backend_url, [update]) == [{"ok": True}]
            until = time.time()
            first, second = await recv_json(stays), await recv_json(rejoins)
            assert_update(first, update, since, until)
            assert first == second
