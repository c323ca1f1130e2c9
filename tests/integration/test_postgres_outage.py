"""PostgreSQL goes away for ~1.5 s and comes back on the same port, under two servers and a producer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresServer
from tests.support.processes import workdir
from tests.support.producers import producer_call, run_producer
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer, serving_pair

from .client import connect_dream, established, recv_json, send_json
from .outage import check_delivery_across_outage

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
    with serving_pair(outage_postgres.url, tmp_path_factory, "pg-outage-server") as pair:
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


async def test_every_update_that_returned_reaches_every_client_across_an_outage(
    outage_postgres: PostgresServer,
    outage_servers: tuple[UvicornServer, UvicornServer],
    make_token: TokenFactory,
    request: pytest.FixtureRequest,
) -> None:
    """PostgreSQL stops for 1.5 s mid-stream; 6 clients on 2 servers get every update, in order."""
    figures = await check_delivery_across_outage(
        outage_postgres, outage_servers, make_token, updates=80, down_for=OUTAGE
    )
    request.node.user_properties.append(("postgres_outage_figures", figures))
    print("postgres outage figures:", figures)
