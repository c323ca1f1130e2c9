"""The PostgreSQL backend against a real server (the session's PostgresServer)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from starlette_dream_ws.groups import BackendConnectionLost, GroupLayer, Position, Published
from starlette_dream_ws.groups.backends.postgres import (
    MAX_CHANNEL_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PAYLOAD_BYTES,
    PayloadTooLarge,
    PostgresBackend,
)
from starlette_dream_ws.settings import Settings
from tests.support.postgres import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

#: Seconds any single wait may take.
TIMEOUT = 5.0


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def url(postgres_server: PostgresServer) -> str:
    return postgres_server.url


@pytest.fixture
async def admin(url: str) -> AsyncIterator[Any]:
    """A plain asyncpg connection, to look at and act on the server from outside the backend."""
    connection = await asyncpg.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


@asynccontextmanager
async def connected(url: str, table: str | None = None, **options: Any) -> AsyncIterator[PostgresBackend]:
    """A backend on its own history table, unless told (tests do not see each other's rows)."""
    backend = PostgresBackend(url, table=table or unique("history"), **options)
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.disconnect()


async def next_event(backend: PostgresBackend) -> Published:
    event = await asyncio.wait_for(backend.next_published(), TIMEOUT)
    assert isinstance(event, Published)
    return event


def position(event: Published) -> int:
    assert event.position is not None, event
    return event.position.seq


async def latest_text(backend: PostgresBackend, channel: str) -> str | None:
    latest = await backend.latest(channel)
    return None if latest is None else latest.text


async def texts(backend: PostgresBackend, channel: str, after: Position | None = None) -> list[str]:
    return [event.text for event in (await backend.history(channel, after)).messages]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT) -> None:
    """Poll `check` until it is true, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {check}")
        await asyncio.sleep(0.02)


async def listener_pid(admin: Any, channel: str) -> int:
    """The server process of the connection whose last command was LISTEN on `channel`."""
    pid = await admin.fetchval("SELECT pid FROM pg_stat_activity WHERE query = $1", f'LISTEN "{channel}"')
    assert isinstance(pid, int), f"no listener on {channel}"
    return pid


# -- publish and subscribe ----------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
async def test_published_messages_arrive_in_order_and_are_kept_as_history(url: str, scheme: str) -> None:
    url = url.replace("postgresql://", f"{scheme}://", 1)
    async with connected(url) as backend:
        channel = unique("dream_images")
        await backend.subscribe([channel])
        texts = ['{"type":"image_update","n":1}', '{"type":"image_update","n":2}', "ünïcødé ✓"]
        for text in texts:
            await backend.publish(channel, text)
        received = [await next_event(backend) for _ in texts]
        assert [(event.channel, event.text) for event in received] == [(channel, text) for text in texts]
        assert [position(event) for event in received] == [1, 2, 3]
        epoch = received[0].position.epoch if received[0].position else ""
        assert {event.position.epoch for event in received if event.position} == {epoch}

        assert await latest_text(backend, channel) == texts[-1]
        history = await backend.history(channel, None)
        assert history.current == Position(epoch, 3)
        assert [(e.text, e.position) for e in history.messages] == [(e.text, e.position) for e in received]
        assert [e.text for e in (await backend.history(channel, Position(epoch, 1))).messages] == texts[1:]
        assert (await backend.history(channel, Position(epoch, 3))).messages == []
        assert await backend.latest(unique("nobody")) is None
        (fresh,) = await backend.positions([unique("nobody")])
        assert fresh.seq == 0 and fresh.epoch


async def test_a_message_from_another_process_reaches_every_listener(url: str) -> None:
    async with connected(url) as first, connected(url) as second:
        channel = unique("dream_images")
        await first.subscribe([channel])
        await second.subscribe([channel])
        async with connected(url) as publisher:
            await publisher.publish(channel, "hello")
        assert (await next_event(first)).text == "hello"
        assert (await next_event(second)).text == "hello"


async def test_channel_names_are_quoted_and_matched_exactly(url: str) -> None:
    async with connected(url) as backend:
        base = unique("Dream")
        channels = [base, base.lower(), f'{base} "quoted"; DROP', base + "x" * (MAX_CHANNEL_BYTES - len(base))]
        for channel in channels:
            await backend.subscribe([channel])
        for channel in channels:
            await backend.publish(channel, f"to {channel}")
        received = {(event.channel, event.text) for event in [await next_event(backend) for _ in channels]}
        assert received == {(channel, f"to {channel}") for channel in channels}
        for bad in ("", "x" * (MAX_CHANNEL_BYTES + 1), "é" * 32, "nul\x00"):
            with pytest.raises(ValueError, match="channel name"):
                await backend.subscribe([bad])
            with pytest.raises(ValueError, match="channel name"):
                await backend.publish(bad, "x")


async def test_unsubscribe_stops_delivery_of_that_channel_only(url: str) -> None:
    async with connected(url) as backend:
        left, stays = unique("left"), unique("stays")
        await backend.subscribe([left])
        await backend.subscribe([stays])
        await backend.unsubscribe([left])
        await backend.publish(left, "not for us")
        await backend.publish(stays, "for us")
        event = await next_event(backend)
        assert (event.channel, event.text) == (stays, "for us")
        await backend.unsubscribe([left])  # twice is harmless


async def test_concurrent_publishes_and_subscribes_share_no_connection_and_keep_order(url: str) -> None:
    """broadcaster's backend runs them all on one asyncpg connection, which refuses that."""
    async with connected(url) as backend, connected(url) as publisher:
        channel = unique("busy")
        await backend.subscribe([channel])
        others = [unique("other") for _ in range(10)]
        await asyncio.gather(
            *(publisher.publish(channel, str(n)) for n in range(50)), *(backend.subscribe([o]) for o in others)
        )
        received = [await next_event(backend) for _ in range(50)]
        assert sorted(int(event.text) for event in received) == list(range(50))
        # Concurrent publishers of one group take turns: seqs grow in the order NOTIFY delivers.
        assert [position(event) for event in received] == list(range(1, 51))
        assert [e.position for e in (await publisher.history(channel, None)).messages] == [e.position for e in received]


async def test_a_message_too_big_for_notify_is_refused_before_anything_is_sent(url: str, admin: Any) -> None:
    # The server's own limit, which our constant mirrors: a payload of 8000 bytes is refused.
    await admin.execute("SELECT pg_notify('limit_probe', $1)", "x" * MAX_PAYLOAD_BYTES)
    with pytest.raises(asyncpg.InvalidParameterValueError, match="payload string too long"):
        await admin.execute("SELECT pg_notify('limit_probe', $1)", "x" * (MAX_PAYLOAD_BYTES + 1))

    async with connected(url) as backend:
        channel = unique("big")
        await backend.subscribe([channel])
        biggest = "é" * (MAX_MESSAGE_BYTES // 2) + "x" * (MAX_MESSAGE_BYTES % 2)  # counted in bytes
        assert len(biggest.encode()) == MAX_MESSAGE_BYTES
        await backend.publish(channel, biggest)
        assert (await next_event(backend)).text == biggest

        with pytest.raises(PayloadTooLarge, match=f"at most {MAX_MESSAGE_BYTES} bytes") as raised:
            await backend.publish(channel, biggest + "x")
        assert isinstance(raised.value, ValueError)  # the layer raises it at once, without retrying
        with pytest.raises(TypeError):
            await backend.publish(channel, b"bytes")
        await backend.publish(channel, "small")
        assert (await next_event(backend)).text == "small"  # nothing was sent in between
        assert await latest_text(backend, channel) == "small"


# -- a lost connection --------------------------------------------------------------------


async def test_a_terminated_connection_makes_next_published_raise(url: str, admin: Any) -> None:
    async with connected(url) as backend:
        channel = unique("doomed")
        await backend.subscribe([channel])
        await backend.publish(channel, "before")
        assert (await next_event(backend)).text == "before"
        reader = asyncio.create_task(backend.next_published())
        await admin.execute("SELECT pg_terminate_backend($1)", await listener_pid(admin, channel))
        with pytest.raises(BackendConnectionLost) as raised:
            await asyncio.wait_for(reader, TIMEOUT)
        assert isinstance(raised.value, ConnectionError)  # what the layer reconnects on
        with pytest.raises(BackendConnectionLost):
            await backend.subscribe([channel])
        with pytest.raises(BackendConnectionLost):
            await next_event(backend)


async def test_disconnect_wakes_a_waiting_reader(url: str) -> None:
    backend = PostgresBackend(url, table=unique("history"))
    await backend.connect()
    reader = asyncio.create_task(backend.next_published())
    await asyncio.sleep(0)
    await backend.disconnect()
    with pytest.raises(BackendConnectionLost):
        await asyncio.wait_for(reader, TIMEOUT)


async def test_a_reader_that_falls_behind_gets_what_was_buffered_then_the_loss(url: str, admin: Any) -> None:
    async with connected(url, max_pending=5) as backend:
        channel = unique("flood")
        await backend.subscribe([channel])
        pid = await listener_pid(admin, channel)
        for n in range(8):
            await backend.publish(channel, str(n))

        async def listener_gone() -> bool:
            return not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)

        await eventually(listener_gone)  # the backend hung up when the sixth arrived
        assert [(await next_event(backend)).text for _ in range(5)] == ["0", "1", "2", "3", "4"]
        with pytest.raises(BackendConnectionLost, match="fell behind"):
            await next_event(backend)


async def test_an_unresponsive_server_is_noticed_by_the_idle_probe(url: str, admin: Any) -> None:
    async with connected(url, idle_check_interval=0.1, idle_check_timeout=0.3) as backend:
        channel = unique("probed")
        await backend.subscribe([channel])
        pid = await listener_pid(admin, channel)  # before the probes, whose SELECT becomes its last query
        # Healthy: several probes pass unnoticed, and a later message still arrives.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(backend.next_published(), 0.5)
        await backend.publish(channel, "still here")
        assert (await next_event(backend)).text == "still here"

        # A server process that stops answering (as behind a dead network link) is given up on.
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(BackendConnectionLost, match="does not answer"):
                await next_event(backend)
            assert time.monotonic() - started < 0.1 + 0.3 + 1.0
        finally:
            os.kill(pid, signal.SIGCONT)


# -- history ------------------------------------------------------------------------------


async def test_history_keeps_the_newest_messages_of_each_group(url: str) -> None:
    async with connected(url, history_size=3) as backend:
        channel, other = unique("kept"), unique("other")
        for n in range(5):
            await backend.publish(channel, str(n))
        await backend.publish(other, "other")
        assert await texts(backend, channel) == ["2", "3", "4"]
        assert await texts(backend, other) == ["other"]
        assert await latest_text(backend, channel) == "4"


async def test_history_expires_and_is_purged(url: str, admin: Any) -> None:
    table = unique("history")
    backend = PostgresBackend(url, table=table, ttl=0.2)
    await backend.connect()
    try:
        channel = unique("short_lived")
        first = await backend.publish(channel, "soon gone")
        assert await latest_text(backend, channel) == "soon gone"

        async def expired() -> bool:
            return await backend.latest(channel) is None

        await eventually(expired)
        history = await backend.history(channel, None)
        assert history.messages == [] and history.current.epoch != first.epoch
        # The expired row is still there until a publish (to any group) purges it.
        assert await admin.fetchval(f'SELECT count(*) FROM "{table}" WHERE grp = $1', channel) == 1
        await backend.publish(unique("another"), "x")
        assert await admin.fetchval(f'SELECT count(*) FROM "{table}" WHERE grp = $1', channel) == 0
    finally:
        await backend.disconnect()


async def test_backends_connecting_at_once_create_their_table_once(url: str) -> None:
    table = unique("history")
    backends = [PostgresBackend(url, table=table) for _ in range(10)]
    try:
        await asyncio.gather(*(backend.connect() for backend in backends))
        await backends[3].publish("g", "x")
        assert await latest_text(backends[7], "g") == "x"
    finally:
        await asyncio.gather(*(backend.disconnect() for backend in backends))


async def test_a_lost_history_starts_a_new_epoch(url: str, admin: Any) -> None:
    """As Redis restarted without data: the positions are gone, so are the seqs they counted."""
    table = unique("history")
    backend = PostgresBackend(url, table=table)
    await backend.connect()
    try:
        channel = unique("emptied")
        await backend.publish(channel, "first")
        first = await backend.publish(channel, "second")
        await admin.execute(f'TRUNCATE "{table}", "{table}_positions"')
        again = await backend.publish(channel, "third")
        assert (first.seq, again.seq) == (2, 1) and again.epoch != first.epoch
        assert await texts(backend, channel, first) == ["third"]
        assert not (await backend.history(channel, first)).complete_after(first)
    finally:
        await backend.disconnect()


# -- with the groups layer ----------------------------------------------------------------


class Inbox:
    def __init__(self) -> None:
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def deliver(self, event: dict[str, Any]) -> None:
        self.events.put_nowait(event)


async def test_the_layer_reconnects_and_delivers_what_was_published_meanwhile(url: str, admin: Any) -> None:
    table = unique("history")
    settings = Settings(broadcast_url=url, reconnect_backoff=0.05)
    layer = GroupLayer(settings, backend_factory=lambda u: PostgresBackend(u, table=table))
    group = unique("dream_images")
    inbox = Inbox()
    try:
        await layer.join(group, inbox)
        async with connected(url, table) as producer:
            await producer.publish(group, '{"type":"n","n":0}')
            assert (await asyncio.wait_for(inbox.events.get(), TIMEOUT))["n"] == 0

            await admin.execute("SELECT pg_terminate_backend($1)", await listener_pid(admin, group))
            for n in range(1, 21):  # during and after the reconnect
                await producer.publish(group, f'{{"type":"n","n":{n}}}')
                await asyncio.sleep(0.01)

            got = [(await asyncio.wait_for(inbox.events.get(), TIMEOUT))["n"] for _ in range(20)]
            assert got == list(range(1, 21))  # each once, in order
            assert layer.reconnects == 1 and layer.healthy
            latest = await layer.latest(group)
            assert latest is not None and (latest["n"], latest["seq"]) == (20, 21)
    finally:
        await layer.disconnect()
