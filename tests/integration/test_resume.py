"""Resume across processes: a client dropped mid-stream reconnects to the OTHER server with its
last position and gets every update exactly once, in order, over WebSocket and over SSE; a
lost history (Redis restarted empty) or one too short for the gap says `recovered: false` and
sends the latest state. Real uvicorn processes, a real producer process, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.support.processes import workdir
from tests.support.producers import ProducerProcess, producer_call, run_producer
from tests.support.redis import RedisServer
from tests.support.tokens import TokenFactory
from tests.support.uvicorn import UvicornServer, serving_pair

from .client import connect_dream, established, recv_json

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

UPDATES = 300
PACE = 0.01  # ~100 updates/s
DROP_AFTER = 100


def steady_stream(dream: int, count: int = UPDATES) -> list[dict[str, Any]]:
    return [{**producer_call(dream, None, "processing", f"n={n}"), "pause_before": PACE} for n in range(1, count + 1)]


async def sse_events(
    server: UvicornServer, dream: int, token: str, last_event_id: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """The events of a real HTTP stream from `server`, each as `{"event", "id", "data"}`."""
    headers = {"Authorization": f"Bearer {token}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    url = f"{server.base_url}/dreams/{dream}/events"
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=15.0)) as client:
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            fields: dict[str, Any] = {}
            async for line in response.aiter_lines():
                if line == "":
                    if "data" in fields:
                        yield {**fields, "data": json.loads(fields["data"])}
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")


class Tally:
    """What one client saw: the seq of every update, in arrival order."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.epochs: set[str] = set()

    def add(self, update: dict[str, Any]) -> None:
        self.seqs.append(update["seq"])
        self.epochs.add(update["epoch"])

    def figures(self, sent: int) -> dict[str, int]:
        return {
            "sent": sent,
            "received": len(self.seqs),
            "duplicates": len(self.seqs) - len(set(self.seqs)),
            "gaps": sent - len(set(self.seqs)),
        }


async def ws_until(ws: Any, tally: Tally, last: int | None = None, count: int | None = None) -> None:
    while True:
        message = await recv_json(ws, timeout=15.0)
        if message["type"] != "image_update":
            continue
        tally.add(message)
        if (last is not None and message["seq"] >= last) or (count is not None and len(tally.seqs) >= count):
            return


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_dropped_client_resumes_on_the_other_server_with_every_update_once(
    servers: tuple[UvicornServer, UvicornServer],
    backend_url: str,
    make_token: TokenFactory,
    transport: str,
    request: pytest.FixtureRequest,
) -> None:
    server_a, server_b = servers
    dream = 51
    token = make_token("admin")
    tally = Tally()
    async with connect_dream(server_a, dream, token) as ws:
        epoch = (await established(ws, dream))["epoch"]
        producer = ProducerProcess(backend_url, steady_stream(dream))
        await ws_until(ws, tally, count=DROP_AFTER)
    # Dropped mid-stream: the producer goes on while the client is away.
    since = f"{epoch}:{tally.seqs[-1]}"
    if transport == "websocket":
        async with connect_dream(server_b, dream, token + f"&since={since}") as ws:
            greeting = await established(ws, dream)
            assert (greeting["recovered"], greeting["epoch"]) == (True, epoch)
            await ws_until(ws, tally, last=UPDATES)
    else:
        events = sse_events(server_b, dream, token, last_event_id=since)
        first = await anext(events)
        assert first["event"] == "connection_established"
        assert (first["data"]["recovered"], first["data"]["epoch"]) == (True, epoch)
        async for event in events:
            assert (
                event["event"] == "image_update" and event["id"] == f"{event['data']['epoch']}:{event['data']['seq']}"
            )
            tally.add(event["data"])
            if event["data"]["seq"] >= UPDATES:
                break
        await events.aclose()
    outcomes = await asyncio.to_thread(producer.result, 60.0)
    assert outcomes == [{"ok": True}] * UPDATES
    assert tally.seqs == list(range(1, UPDATES + 1)), "not every update exactly once, in order"
    assert tally.epochs == {epoch}
    figures = tally.figures(UPDATES)
    print(f"\nresume {transport} on {request.node.callspec.params['backend_url']}: {figures}")
    assert figures["duplicates"] == figures["gaps"] == 0


async def test_a_history_too_short_for_the_gap_is_not_recovered(
    servers: tuple[UvicornServer, UvicornServer], backend_url: str, make_token: TokenFactory
) -> None:
    server_a, server_b = servers
    dream = 52
    token = make_token("admin")
    # Published with a history of 5 per dream. Redis trims its streams by whole blocks (of 100
    # entries by default: `MAXLEN ~`), so the gap is made longer than a block.
    total = 260
    calls = [producer_call(dream, None, "processing", f"n={n}") for n in range(1, total + 1)]
    assert await asyncio.to_thread(run_producer, backend_url, calls[:5]) == [{"ok": True}] * 5
    async with connect_dream(server_a, dream, token) as ws:
        epoch = (await established(ws, dream))["epoch"]
    producer = ProducerProcess(backend_url, calls[5:], env={"DREAM_WS_HISTORY_SIZE": "5"})
    assert await asyncio.to_thread(producer.result, 60.0) == [{"ok": True}] * (total - 5)
    async with connect_dream(server_b, dream, token + f"&since={epoch}:5") as ws:
        greeting = await established(ws, dream)
        assert (greeting["recovered"], greeting["epoch"], greeting["seq"]) == (False, epoch, total)
        latest = await recv_json(ws)
        assert (latest["type"], latest["seq"], latest["message"]) == ("image_update", total, f"n={total}")
    # Within the kept five, it still resumes.
    async with connect_dream(server_a, dream, token + f"&since={epoch}:{total - 3}") as ws:
        assert (await established(ws, dream))["recovered"] is True
        assert [(await recv_json(ws))["seq"] for _ in range(3)] == [total - 2, total - 1, total]


# -- a Redis restarted empty ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def restart_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of this module's own, so that restarting it disturbs no other module."""
    with RedisServer(workdir=workdir(tmp_path_factory, "resume-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def restart_servers(
    restart_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[UvicornServer, UvicornServer]]:
    with serving_pair(restart_redis.url, tmp_path_factory, "resume-server") as pair:
        yield pair


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_after_redis_restarted_empty_a_new_epoch_is_not_recovered_and_gets_the_latest(
    restart_redis: RedisServer,
    restart_servers: tuple[UvicornServer, UvicornServer],
    make_token: TokenFactory,
    transport: str,
) -> None:
    server_a, server_b = restart_servers
    dream = 53 if transport == "websocket" else 54
    token = make_token("admin")
    before = [(await asyncio.to_thread(s.wait_backend_connected, 15.0))["backend_reconnects"] for s in restart_servers]
    calls = [producer_call(dream, None, "processing", f"old {n}") for n in range(1, 4)]
    assert await asyncio.to_thread(run_producer, restart_redis.url, calls) == [{"ok": True}] * 3
    async with connect_dream(server_a, dream, token) as ws:
        old_epoch = (await established(ws, dream))["epoch"]

    restart_redis.stop()
    restart_redis.start()  # empty: no persistence
    for server, reconnects in zip(restart_servers, before, strict=True):
        await asyncio.to_thread(server.wait_reconnected, reconnects)
    new = producer_call(dream, ["https://cdn.example/new.png"], "completed", "after the restart")
    assert await asyncio.to_thread(run_producer, restart_redis.url, [new]) == [{"ok": True}]

    since = f"{old_epoch}:3"
    if transport == "websocket":
        async with connect_dream(server_b, dream, token + f"&since={since}") as ws:
            greeting = await established(ws, dream)
            latest = await recv_json(ws)
    else:
        events = sse_events(server_b, dream, token, last_event_id=since)
        greeting = (await anext(events))["data"]
        latest = (await anext(events))["data"]
        await events.aclose()
    assert greeting["recovered"] is False and greeting["epoch"] != old_epoch and greeting["seq"] == 1
    assert (latest["type"], latest["epoch"], latest["seq"]) == ("image_update", greeting["epoch"], 1)
    assert latest["message"] == "after the restart"
