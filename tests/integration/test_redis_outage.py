"""Redis goes away for ~1.5 s and comes back on the same port, under a producer and a server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from .client import connect_dream, established, recv_json, send_json
from .conftest import TokenFactory, server_env, serving, workdir
from .servers import ProducerProcess, RedisServer, UvicornServer, producer_call, run_producer

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

OUTAGE = 1.5


@pytest.fixture(scope="module")
def outage_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of this module's own: stopping it must not disturb the other modules' servers."""
    with RedisServer(workdir=workdir(tmp_path_factory, "outage-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def outage_server(outage_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    server = UvicornServer(server_env(outage_redis.url), workdir=workdir(tmp_path_factory, "outage-server"))
    with serving(server):
        yield server


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

        # KNOWN GAP (to be closed later): a message published while a server is still
        # reconnecting/re-subscribing is lost for that server's clients (pub/sub keeps nothing).
        # So the update sent during the outage may or may not have been pushed live; either way
        # it is the recorded latest state, which the client gets on request. Once /health says
        # connected, new updates are pushed to the connection that lived through the outage.
        await send_json(ws, {"type": "request_status"})
        after = producer_call(21, ["https://cdn.example/21/b.png"], "delete_processing", "after the outage")
        assert await asyncio.to_thread(run_producer, outage_redis.url, [after]) == [{"ok": True}]

        received = [await recv_json(ws)]
        while received[-1]["type"] == "image_update" and received[-1]["message"] == during["message"]:
            received.append(await recv_json(ws))
        *earlier, last = received
        # The outage update: once as the status answer, perhaps once more as a live push.
        assert 1 <= len(earlier) <= 2 and all(message == earlier[0] for message in earlier), received
        assert (earlier[0]["dream_id"], earlier[0]["status"], earlier[0]["images"]) == (
            21,
            "completed",
            ["https://cdn.example/21/a.png"],
        )
        assert isinstance(earlier[0]["timestamp"], float)
        assert last["type"] == "image_update" and last["message"] == "after the outage", received
        assert last["status"] == "delete_processing" and last["images"] == ["https://cdn.example/21/b.png"]
        request.node.user_properties.append(("outage_update_pushed_live", len(earlier) == 2))
