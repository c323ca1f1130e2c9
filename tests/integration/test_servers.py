"""The core cases on every major ASGI server, each a real process: uvicorn (websockets-sansio and
wsproto), Hypercorn, Granian and Daphne, serving the app mounted at `/ws` in a Starlette app
with the lifespan helper, on the session's Redis.

Per server kind, four processes start together once per module: A and B (fan-out between
them, and every case that needs a plain server), one with a short heartbeat, and one that the
shutdown case stops. What a server cannot do is in `tests/support/servers.py` (`TRAITS`) and
docs/servers.md; a case it fails for that reason checks the documented behaviour, then xfails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any, NamedTuple

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.support.processes import workdir
from tests.support.producers import producer_call, run_producer
from tests.support.redis import RedisServer
from tests.support.servers import SERVER_KINDS, TRAITS, ServerKind, asgi_server
from tests.support.tokens import OTHER_SECRET, TokenFactory
from tests.support.uvicorn import UvicornServer, server_env, serving

from .client import (
    RECEIVE_TIMEOUT,
    SUBPROTOCOL,
    TRANSPORTS,
    connect_dream,
    established,
    expect_close,
    recv_json,
    send_json,
)

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

APP = "served_app:mounted_with_lifespan"
MOUNT = "/ws"
#: The heartbeat server's interval (its timeout is the default, twice that).
HEARTBEAT = 0.3
#: What SIGTERM may take, from the signal to the process's exit, with clients connected.
SHUTDOWN_BOUND = 5.0
#: Every status of the protocol, then progress: a burst a producer sends without pausing.
BURST = [
    producer_call(7, [f"https://cdn.example/7/{n}.png"], status, f"#{n}")
    for n, status in enumerate(
        ["processing", "completed", "failed", "delete_processing", "delete_completed", "delete_failed"]
    )
] + [producer_call(7, None, "processing", f"#{n}") for n in range(6, 24)]


class KindServers(NamedTuple):
    """The processes of one server kind (a tuple, so that a failure report shows their logs)."""

    kind: ServerKind
    a: UvicornServer
    b: UvicornServer
    heartbeat: UvicornServer
    #: Stopped by the shutdown case.
    victim: UvicornServer


@pytest.fixture(scope="module", params=SERVER_KINDS)
def servers_of(
    request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KindServers]:
    kind: ServerKind = request.param
    env = server_env(redis_server.url)
    fast = server_env(redis_server.url, DREAM_WS_HEARTBEAT_INTERVAL=str(HEARTBEAT))
    servers = {
        name: asgi_server(kind, name_env, APP, mount=MOUNT, workdir=workdir(tmp_path_factory, f"{kind}-{name}"))
        for name, name_env in (("a", env), ("b", env), ("heartbeat", fast), ("victim", env))
    }
    group = KindServers(kind, **servers)
    # Started side by side; stopped afterwards, failing the module if one did not stop cleanly.
    with serving(group.a, group.b, group.heartbeat, group.victim):
        yield group


async def publish(redis_server: RedisServer, calls: list[dict[str, Any]]) -> None:
    """Run the calls in one producer process (one backend connection, no pause between them)."""
    assert await asyncio.to_thread(run_producer, redis_server.url, calls) == [{"ok": True}] * len(calls)


def assert_update(received: dict[str, Any], sent: dict[str, Any]) -> None:
    assert received["type"] == "image_update", received
    assert (received["dream_id"], received["status"], received["message"]) == (
        sent["dream_id"],
        sent["status"],
        sent["message"],
    )
    assert received["images"] == (sent["image_urls"] or [])


async def close_code_or_none(ws: ClientConnection, timeout: float = RECEIVE_TIMEOUT) -> int | None:
    """The server's close code, or None when the connection ended without a close frame (1006)."""
    try:
        extra = await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    raise AssertionError(f"expected the server to close, got {extra!r}")


async def test_the_token_travels_by_query_header_or_subprotocol(
    servers_of: KindServers, make_token: TokenFactory
) -> None:
    server = servers_of.a
    log_start = len(server.log_text())
    tokens = {transport: make_token("u12") for transport in TRANSPORTS}
    for transport in TRANSPORTS:
        async with connect_dream(server, 12, tokens[transport], transport) as ws:
            # The subprotocol is chosen, and never the one that carries the token.
            assert ws.subprotocol == (SUBPROTOCOL if transport == "subprotocol" else None)
            await established(ws, 12)
            await send_json(ws, {"type": "ping", "timestamp": 3.5})
            assert await recv_json(ws) == {"type": "pong", "timestamp": 3.5}
    log = server.log_text()[log_start:]
    leaked = [transport for transport, token in tokens.items() if token in log]
    assert leaked == [], f"tokens in the {servers_of.kind} log: {leaked}"


async def test_a_bad_token_is_4401_and_a_user_not_allowed_is_4403(
    servers_of: KindServers, make_token: TokenFactory
) -> None:
    for transport in TRANSPORTS:
        for token, code, close_code in (
            (make_token("u7", secret=OTHER_SECRET), "unauthenticated", 4401),
            (make_token("u8"), "forbidden", 4403),
        ):
            async with connect_dream(servers_of.b, 7, token, transport) as ws:
                error = await recv_json(ws)
                assert error["type"] == "error" and error["code"] == code, (transport, error)
                assert await expect_close(ws) == close_code, transport


async def test_an_update_fans_out_to_the_clients_of_two_processes(
    servers_of: KindServers, redis_server: RedisServer, make_token: TokenFactory
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        watchers = [
            await stack.enter_async_context(connect_dream(servers_of.a, 7, make_token("u7"), "query")),
            await stack.enter_async_context(connect_dream(servers_of.b, 7, make_token("admin"), "header")),
            await stack.enter_async_context(connect_dream(servers_of.b, 7, make_token("u7"), "subprotocol")),
        ]
        other = await stack.enter_async_context(connect_dream(servers_of.a, 8, make_token("u8")))
        for ws in watchers:
            await established(ws, 7)
        await established(other, 8)

        update = producer_call(7, ["https://cdn.example/7/fan.png"], "completed", "fan-out")
        await publish(redis_server, [update])
        received = [await recv_json(ws) for ws in watchers]
        assert_update(received[0], update)
        assert received[1:] == received[:1] * 2  # the same message, position and all, on both processes
        # Dream 8's client got nothing: the next thing it reads is the answer to its own ping.
        await send_json(other, {"type": "ping", "timestamp": 8.0})
        assert await recv_json(other) == {"type": "pong", "timestamp": 8.0}


async def test_updates_in_quick_succession_all_arrive_in_order(
    servers_of: KindServers, redis_server: RedisServer, make_token: TokenFactory
) -> None:
    # Granian's `send` always waits (a Rust future); before the eager start handed that future
    # to its task as the coroutine yielded it, a burst lost every update from the first wait on.
    async with (
        connect_dream(servers_of.a, 7, make_token("u7"), "subprotocol") as on_a,
        connect_dream(servers_of.b, 7, make_token("admin"), "query") as on_b,
    ):
        await established(on_a, 7)
        await established(on_b, 7)
        await publish(redis_server, BURST)
        for ws in (on_a, on_b):
            received = [await recv_json(ws) for _ in BURST]
            for got, sent in zip(received, BURST, strict=True):
                assert_update(got, sent)
            seqs = [message["seq"] for message in received]
            assert seqs == list(range(seqs[0], seqs[0] + len(BURST))), seqs


async def test_request_status_returns_the_latest_update(
    servers_of: KindServers, redis_server: RedisServer, make_token: TokenFactory
) -> None:
    calls = [producer_call(7, None, "processing", f"step {n}") for n in range(3)]
    calls.append(producer_call(7, ["https://cdn.example/7/final.png"], "completed", None))
    async with connect_dream(servers_of.a, 7, make_token("u7"), "header") as ws:
        await established(ws, 7)
        await publish(redis_server, calls)
        pushed = [await recv_json(ws) for _ in calls]
        assert_update(pushed[-1], calls[-1])
        await send_json(ws, {"type": "request_status"})
        assert await recv_json(ws) == pushed[-1]  # the very message pushed, timestamp and all
    # From the backend, on the other process, to a client that saw none of it.
    async with connect_dream(servers_of.b, 7, make_token("admin"), "subprotocol") as late:
        await established(late, 7)
        await send_json(late, {"type": "request_status", "dream_id": 7})
        assert await recv_json(late) == pushed[-1]


async def test_heartbeat_pings_keep_an_answering_client_and_close_a_silent_one_with_4408(
    servers_of: KindServers, make_token: TokenFactory
) -> None:
    server = servers_of.heartbeat
    async with (
        connect_dream(server, 7, make_token("u7")) as silent,
        connect_dream(server, 7, make_token("u7"), "header") as answering,
    ):
        for ws in (silent, answering):
            assert (await established(ws, 7))["heartbeat_interval"] == HEARTBEAT

        async def answer_pings() -> None:
            while (message := await recv_json(answering, timeout=2))["type"] == "ping":
                await send_json(answering, {"type": "pong", "timestamp": message["timestamp"]})
            raise AssertionError(f"the answering client got {message}")

        answering_task = asyncio.create_task(answer_pings())
        try:
            started = time.monotonic()
            pings = 0
            while (message := await recv_json(silent, timeout=2))["type"] == "ping":
                assert isinstance(message["timestamp"], float)
                pings += 1
            assert message["type"] == "error" and message["code"] == "heartbeat_timeout", message
            assert await expect_close(silent, timeout=2) == 4408
            assert pings >= 1 and time.monotonic() - started >= 2 * HEARTBEAT - 0.05
            # The client that answers outlives the silent one by another timeout: no error, no close.
            done, _ = await asyncio.wait({answering_task}, timeout=2 * HEARTBEAT)
            assert not done, answering_task
        finally:
            answering_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answering_task


async def test_a_frame_over_max_message_size_is_answered_then_closed(
    servers_of: KindServers, make_token: TokenFactory
) -> None:
    traits = TRAITS[servers_of.kind]
    async with connect_dream(servers_of.a, 7, make_token("u7"), "header") as ws:
        await established(ws, 7)
        # 64 KiB by default, far below every server's own limit (1 MiB and more): the app decides.
        await send_json(ws, {"type": "ping", "padding": "x" * (64 * 1024)})
        error = await recv_json(ws)
        assert error["type"] == "error" and error["code"] == "message_too_big", error
        assert await expect_close(ws) == (1009 if traits.standard_close_codes else 1000)


async def test_sigterm_closes_every_connection_with_1001(servers_of: KindServers, make_token: TokenFactory) -> None:
    server, traits = servers_of.victim, TRAITS[servers_of.kind]
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for transport in TRANSPORTS:
            ws = await stack.enter_async_context(connect_dream(server, 7, make_token("u7"), transport))
            await established(ws, 7)
            clients.append(ws)
        started = time.monotonic()
        stopping = asyncio.create_task(asyncio.to_thread(server.stop))  # SIGTERM, then wait for the exit
        codes = await asyncio.gather(*(close_code_or_none(ws) for ws in clients))
        await stopping
        took = time.monotonic() - started
    assert took < SHUTDOWN_BOUND, f"shutdown took {took:.2f}s"
    assert server.shutdown_problems() == []
    assert codes == [traits.sigterm_close_code] * len(clients), codes
    if traits.sigterm_close_code != 1001:
        pytest.xfail(traits.note)


async def test_hypercorn_with_worker_processes_closes_with_1011_after_its_graceful_timeout(
    redis_server: RedisServer, make_token: TokenFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Hypercorn's default (`--workers 1`) runs the app in a child process that SIGTERM never
    reaches: the app is told nothing until its connections are cancelled at the graceful timeout."""
    server = asgi_server(
        "hypercorn",
        server_env(redis_server.url),
        APP,
        mount=MOUNT,
        workdir=workdir(tmp_path_factory, "hypercorn-workers"),
        options=["--workers", "1", "--graceful-timeout", "1"],
    )
    try:
        server.start()
        async with connect_dream(server, 7, make_token("u7")) as ws:
            await established(ws, 7)
            started = time.monotonic()
            stopping = asyncio.create_task(asyncio.to_thread(server.stop))
            code = await close_code_or_none(ws)
            waited = time.monotonic() - started
            await stopping
        assert server.returncode == 0
        assert code == 1011 and waited >= 1.0, (code, waited)
    finally:
        server.close()
    pytest.xfail("Hypercorn with worker processes: clients get 1011 after --graceful-timeout; use --workers 0")


async def sse_events(server: UvicornServer, dream: int, token: str) -> AsyncGenerator[dict[str, Any], None]:
    """The events of `GET <mount>/dreams/<dream>/events`, each as `{"event", "id", "data"}`."""
    url = f"{server.base_url}{server.mount}/dreams/{dream}/events"
    async with httpx.AsyncClient(timeout=httpx.Timeout(RECEIVE_TIMEOUT)) as client:
        async with client.stream("GET", url, headers={"Authorization": f"Bearer {token}"}) as response:
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


async def test_server_sent_events_stream_updates_and_refuse_with_http_status(
    servers_of: KindServers, redis_server: RedisServer, make_token: TokenFactory
) -> None:
    server = servers_of.b
    events = sse_events(server, 7, make_token("u7"))
    try:
        first = await asyncio.wait_for(anext(events), RECEIVE_TIMEOUT)
        assert first["event"] == "connection_established" and first["data"]["dream_id"] == 7, first
        calls = [producer_call(7, None, "processing", "sse 1"), producer_call(7, None, "completed", "sse 2")]
        await publish(redis_server, calls)
        for sent in calls:
            event = await asyncio.wait_for(anext(events), RECEIVE_TIMEOUT)
            assert event["event"] == "image_update"
            assert_update(event["data"], sent)
            assert event["id"] == f"{event['data']['epoch']}:{event['data']['seq']}"
    finally:
        await events.aclose()

    url = f"{server.base_url}{server.mount}/dreams/7/events"
    async with httpx.AsyncClient(timeout=RECEIVE_TIMEOUT) as client:
        refused = await client.get(url, headers={"Authorization": f"Bearer {make_token('u8')}"})
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden", refused.text
