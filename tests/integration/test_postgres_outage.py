"""PostgreSQL goes away for ~1.5 s and comes back on the same port, under two servers and a producer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from .client import Transport, connect_dream, established, recv_json, send_json
from .conftest import TokenFactory, server_env, serving, workdir
from .postgres import PostgresServer
from .servers import ProducerProcess, UvicornServer, producer_call, run_producer

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

OUTAGE = 1.5


@pytest.fixture(scope="module")
def outage_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A PostgreSQL of this module's own: stopping it must not disturb the other modules' servers."""
    with PostgresServer(workdir=workdir(tmp_path_factory, "outage-postgres")) as server:
        yield server


@pytest.fixture(scope="module")
def outage_servers(
    outage_postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[UvicornServer, UvicornServer]]:
    env = server_env(outage_postgres.url)
    pair = (
        UvicornServer(env, workdir=workdir(tmp_path_factory, "pg-outage-server-a")),
        UvicornServer(env, workdir=workdir(tmp_path_factory, "pg-outage-server-b")),
    )
    with serving(*pair):
        yield pair


async def test_the_servers_reconnect_by_themselves_and_later_updates_reach_a_client(
    outage_postgres: PostgresServer, outage_servers: tuple[UvicornServer, UvicornServer], make_token: TokenFactory
) -> None:
    server_a, server_b = outage_servers
    befores = [(await asyncio.to_thread(s.wait_backend_connected))["backend_reconnects"] for s in outage_servers]
    async with connect_dream(server_a, 21, make_token("u21")) as ws:
        await established(ws, 21)

        # A fast shutdown: PostgreSQL ends every session at once (as a crash or failover would).
        outage_postgres.stop()
        down_at = time.monotonic()
        for server in outage_servers:
            await asyncio.to_thread(server.wait_backend_connected, 5.0, connected=False)
        # Keep it down for the outage's length (this sleep is the outage, not a synchronisation).
        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
        outage_postgres.start()

        for server, before in zip(outage_servers, befores, strict=True):
            health = await asyncio.to_thread(server.wait_backend_connected, 15.0)
            assert health["backend_reconnects"] > before
        assert (await asyncio.to_thread(server_a.wait_backend_connected))["connections"] == 1

        after = producer_call(21, ["https://cdn.example/21/b.png"], "delete_processing", "after the outage")
        assert await asyncio.to_thread(run_producer, outage_postgres.url, [after]) == [{"ok": True}]
        pushed = await recv_json(ws)
        assert (pushed["type"], pushed["dream_id"], pushed["message"]) == ("image_update", 21, "after the outage")
        await send_json(ws, {"type": "request_status"})
        assert await recv_json(ws) == pushed
    # The other server, which had no client, serves the same latest state.
    async with connect_dream(server_b, 21, make_token("admin"), "header") as ws:
        await established(ws, 21)
        await send_json(ws, {"type": "request_status"})
        assert await recv_json(ws) == pushed


UPDATES = 80
PACE = 0.025  # seconds between two updates of the producer: a steady stream across the outage
CLIENTS_PER_SERVER = 3


async def _collect(ws: ClientConnection, until: str, into: list[dict[str, Any]], started: asyncio.Event) -> None:
    """Record every image_update until the one whose message is `until`."""
    while True:
        message = await recv_json(ws, timeout=30.0)
        if message["type"] != "image_update":
            continue
        into.append(message)
        started.set()
        if message["message"] == until:
            return


async def test_every_update_that_returned_reaches_every_client_across_an_outage(
    outage_postgres: PostgresServer,
    outage_servers: tuple[UvicornServer, UvicornServer],
    make_token: TokenFactory,
    request: pytest.FixtureRequest,
) -> None:
    """PostgreSQL stops for 1.5 s mid-stream; 6 clients on 2 servers get every update, in order."""
    befores = [(await asyncio.to_thread(s.wait_backend_connected, 15.0))["backend_reconnects"] for s in outage_servers]
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for server in outage_servers:
            for n in range(CLIENTS_PER_SERVER):
                transport: Transport = ("query", "header", "subprotocol")[n % 3]
                ws = await stack.enter_async_context(connect_dream(server, 31, make_token("u31"), transport))
                await established(ws, 31)
                clients.append(ws)
        received: list[list[dict[str, Any]]] = [[] for _ in clients]
        started = [asyncio.Event() for _ in clients]
        readers = [
            asyncio.create_task(_collect(ws, "end", into, event))
            for ws, into, event in zip(clients, received, started, strict=True)
        ]

        calls = [
            {**producer_call(31, [f"https://cdn.example/31/{i}.png"], "processing", f"seq={i}"), "pause_before": PACE}
            for i in range(UPDATES)
        ]
        producer = ProducerProcess(outage_postgres.url, calls)
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 15.0)

        outage_postgres.stop()
        # This sleep is the outage itself: PostgreSQL stays down while the producer keeps calling.
        await asyncio.sleep(OUTAGE)
        outage_postgres.start()
        back_at = time.monotonic()
        reconnected_after = []
        for server in outage_servers:
            await asyncio.to_thread(server.wait_backend_connected, 15.0)
            reconnected_after.append(time.monotonic() - back_at)

        outcomes = await asyncio.to_thread(producer.result, 60.0)
        returned = {f"seq={i}" for i, outcome in enumerate(outcomes) if outcome == {"ok": True}}
        final = producer_call(31, [], "completed", "end")
        assert await asyncio.to_thread(run_producer, outage_postgres.url, [final]) == [{"ok": True}]
        await asyncio.wait_for(asyncio.gather(*readers), 30.0)

    for messages in received:
        got = [message["message"] for message in messages]
        assert got[-1] == "end"
        missing = returned - set(got)
        assert not missing, f"{len(missing)} updates that returned normally never arrived: {sorted(missing)[:10]}"
        sequence = [int(text.removeprefix("seq=")) for text in got[:-1]]
        assert sequence == sorted(sequence), "updates arrived out of order"
    # A publish whose commit went through but whose answer was lost is retried: at least once.
    duplicates = max(len(m) - len({x["message"] for x in m}) for m in received)
    for server, before in zip(outage_servers, befores, strict=True):
        assert (await asyncio.to_thread(server.wait_backend_connected))["backend_reconnects"] > before
    figures = {
        "updates_sent": UPDATES,
        "returned_normally": len(returned),
        "clients": len(clients),
        "received_per_client": [len(m) - 1 for m in received],
        "max_duplicates_per_client": duplicates,
        "reconnect_seconds_after_postgres_back": [round(t, 2) for t in reconnected_after],
    }
    request.node.user_properties.append(("postgres_outage_figures", figures))
    print("postgres outage figures:", figures)
