"""Redis goes away for ~1.5 s and comes back on the same port, under a producer and a server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.support.processes import workdir
from tests.support.producers import ProducerProcess, producer_call, run_producer
from tests.support.redis import RedisServer
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer, serving_pair

from .client import connect_dream, established, recv_json, send_json
from .outage import check_delivery_across_outage

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

OUTAGE = 1.5


@pytest.fixture(scope="module")
def outage_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of this module's own: stopping it must not disturb the other modules' servers."""
    with RedisServer(workdir=workdir(tmp_path_factory, "outage-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def outage_servers(
    outage_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[UvicornServer, UvicornServer]]:
    with serving_pair(outage_redis.url, tmp_path_factory, "outage-server") as pair:
        yield pair


@pytest.fixture(scope="module")
def outage_server(outage_servers: tuple[UvicornServer, UvicornServer]) -> UvicornServer:
    return outage_servers[0]


async def test_producer_retries_through_an_outage_and_the_server_reconnects(
    outage_redis: RedisServer,
    outage_server: UvicornServer,
    make_token: TokenFactory,
    request: pytest.FixtureRequest,
) -> None:
    before = (await asyncio.to_thread(outage_server.wait_backend_connected))["backend_reconnects"]
    async with connect_dream(outage_server, 21, make_token("u21")) as ws:
        await established(ws, 21)

        outage_redis.stop()
        down_at = time.monotonic()
        # /health notices: 503, backend_connected false.
        await asyncio.to_thread(outage_server.wait_backend_connected, 5.0, connected=False)

        # A client of a dream nobody watched yet connects during the outage: its handshake is
        # accepted, and joining the group waits (up to publish_timeout, 5 s) for the backend.
        async with connect_dream(outage_server, 22, make_token("admin"), "subprotocol") as late:
            during = producer_call(21, ["https://cdn.example/21/a.png"], "completed", "sent while Redis was down")
            producer = ProducerProcess(outage_redis.url, [during])
            # The producer has really tried (and failed) while Redis is down: its retry is logged.
            await asyncio.to_thread(producer.wait_for_stderr, "attempt 1 of")
            assert producer.process.poll() is None, "the call gave up instead of retrying"
            # Keep Redis down for the outage's length (this sleep is the outage, not a synchronisation).
            await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
            # From the main thread, so that the new process dies with pytest (see servers._preexec).
            outage_redis.start()

            # The call returns normally once Redis is back.
            assert await asyncio.to_thread(producer.result, 20.0) == [{"ok": True}]
            # The waiting client gets in once the server has reconnected.
            await established(late, 22, timeout=8.0)

            # The server reconnected and subscribed again by itself.
            health = await asyncio.to_thread(outage_server.wait_backend_connected, 15.0)
            assert health["backend_reconnects"] > before
            assert health["connections"] == 2

            # Joined after the reconnect: updates published from now on reach it.
            after_22 = producer_call(22, ["https://cdn.example/22.png"], "processing", None)
            assert await asyncio.to_thread(run_producer, outage_redis.url, [after_22]) == [{"ok": True}]
            pushed_22 = await recv_json(late)
            assert (pushed_22["type"], pushed_22["dream_id"], pushed_22["images"]) == (
                "image_update",
                22,
                ["https://cdn.example/22.png"],
            )

        # The update published while the server was still re-subscribing was pushed live anyway:
        # the server read what it missed from the group's history. It is also the latest state.
        pushed = await recv_json(ws)
        assert (pushed["type"], pushed["dream_id"], pushed["status"], pushed["images"]) == (
            "image_update",
            21,
            "completed",
            ["https://cdn.example/21/a.png"],
        )
        assert pushed["message"] == during["message"] and isinstance(pushed["timestamp"], float)
        await send_json(ws, {"type": "request_status"})
        assert await recv_json(ws) == pushed
        after = producer_call(21, ["https://cdn.example/21/b.png"], "delete_processing", "after the outage")
        assert await asyncio.to_thread(run_producer, outage_redis.url, [after]) == [{"ok": True}]
        last = await recv_json(ws)
        assert last["type"] == "image_update" and last["message"] == "after the outage"
        assert last["status"] == "delete_processing" and last["images"] == ["https://cdn.example/21/b.png"]


async def test_every_update_that_returned_reaches_every_client_across_an_outage(
    outage_redis: RedisServer,
    outage_servers: tuple[UvicornServer, UvicornServer],
    make_token: TokenFactory,
    request: pytest.FixtureRequest,
) -> None:
    """Redis stops for 5 s mid-stream and restarts empty on the same port; 6 clients on 2 servers."""
    figures = await check_delivery_across_outage(outage_redis, outage_servers, make_token, updates=120, down_for=5.0)
    request.node.user_properties.append(("outage_figures", figures))
    print("redis outage figures:", figures)
