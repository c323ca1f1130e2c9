"""The memory backend: history with positions, the latest state, expiry, and delivery across
loops and threads, on a clock the test moves."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from starlette_dream_ws.groups import BackendConnectionLost
from starlette_dream_ws.groups.backends import create_backend, memory
from starlette_dream_ws.groups.backends.memory import MemoryBackend

pytestmark = pytest.mark.anyio


class Clock:
    """Stands in for the `time` module inside the memory backend only.

    Patching the module's `time` name (not the global `time.monotonic`) leaves the event
    loop's own clock alone.
    """

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(memory, "time", fake)
    return fake


@pytest.fixture
async def backend() -> AsyncIterator[MemoryBackend]:
    connected = MemoryBackend("memory://test", ttl=10, history_size=3)
    await connected.connect()
    yield connected
    await connected.disconnect()


def channels() -> int:
    hub = memory._hubs.get("memory://test")
    return len(hub.channels) if hub is not None else 0


async def test_publishes_get_increasing_positions_and_reach_subscribers(backend: MemoryBackend) -> None:
    await backend.subscribe(["a"])
    for text in ("1", "2", "3"):
        await backend.publish("a", text)
    await backend.publish("b", "elsewhere")
    got = [await backend.next_published() for _ in range(3)]
    assert [(p.channel, p.text) for p in got] == [("a", "1"), ("a", "2"), ("a", "3")]
    positions = [p.position for p in got]
    assert all(p is not None for p in positions)
    assert positions == sorted(positions) and len(set(positions)) == 3


async def test_history_is_capped_and_read_after_a_position(backend: MemoryBackend) -> None:
    for text in ("1", "2", "3", "4"):
        await backend.publish("a", text)
    kept = await backend.history("a", None)
    assert [p.text for p in kept] == ["2", "3", "4"]  # history_size=3
    assert [p.text for p in await backend.history("a", kept[0].position)] == ["3", "4"]
    assert await backend.history("a", kept[-1].position) == []
    assert await backend.last_positions(["a", "nothing"]) == [kept[-1].position, None]
    assert await backend.latest("a") == "4"
    assert await backend.latest("nothing") is None


async def test_a_channel_expires_ttl_after_its_last_publish(clock: Clock, backend: MemoryBackend) -> None:
    await backend.publish("a", "1")
    clock.advance(5)
    await backend.publish("b", "1")
    clock.advance(4.9)
    assert await backend.latest("a") == "1"
    clock.advance(0.2)
    assert await backend.latest("a") is None
    assert await backend.history("a", None) == []
    assert await backend.latest("b") == "1"


async def test_expired_channels_are_purged_so_the_hub_stays_bounded(clock: Clock, backend: MemoryBackend) -> None:
    # One new channel per second for a long time, each kept 10 seconds, none ever read.
    for n in range(300):
        await backend.publish(f"dream_images_{n}", "x")
        clock.advance(1)
        assert channels() <= 11
    assert channels() >= 10


async def test_every_backend_of_a_url_shares_the_hub_while_one_is_connected(backend: MemoryBackend) -> None:
    other = create_backend("memory://test")
    await other.connect()
    try:
        await backend.subscribe(["a"])
        await other.publish("a", "from the other")
        assert (await backend.next_published()).text == "from the other"
        assert await other.latest("a") == "from the other"
    finally:
        await other.disconnect()
    # Another URL is another broker.
    third = create_backend("memory://another")
    await third.connect()
    try:
        assert await third.latest("a") is None
    finally:
        await third.disconnect()


async def test_the_last_disconnect_forgets_everything() -> None:
    backend = MemoryBackend("memory://test")
    await backend.connect()
    await backend.publish("g", "text")
    await backend.disconnect()
    again = MemoryBackend("memory://test")
    await again.connect()
    try:
        assert await again.latest("g") is None
    finally:
        await again.disconnect()


async def test_a_disconnected_backend_refuses_work_and_wakes_its_reader(backend: MemoryBackend) -> None:
    reader = asyncio.ensure_future(backend.next_published())
    await asyncio.sleep(0)
    await backend.disconnect()
    with pytest.raises(BackendConnectionLost):
        await asyncio.wait_for(reader, 1)
    with pytest.raises(BackendConnectionLost):
        await backend.publish("a", "x")


async def test_publishes_from_another_thread_arrive_in_position_order(backend: MemoryBackend) -> None:
    await backend.subscribe(["a"])

    def publish_from_a_thread() -> None:
        async def publish_all() -> None:
            publisher = MemoryBackend("memory://test")
            await publisher.connect()
            for n in range(200):
                await publisher.publish("a", str(n))
            await publisher.disconnect()

        asyncio.run(publish_all())

    threads = [threading.Thread(target=publish_from_a_thread) for _ in range(2)]
    for thread in threads:
        thread.start()
    got = [await asyncio.wait_for(backend.next_published(), 5) for _ in range(400)]
    for thread in threads:
        thread.join()
    positions = [p.position for p in got]
    assert positions == sorted(positions)  # type: ignore[type-var]
    assert len(set(positions)) == 400


async def test_a_reader_that_falls_behind_gets_what_was_buffered_then_the_loss(
    backend: MemoryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "MAX_PENDING", 5)
    await backend.subscribe(["a"])
    for n in range(7):
        await backend.publish("a", str(n))
    assert [(await backend.next_published()).text for _ in range(5)] == ["0", "1", "2", "3", "4"]
    with pytest.raises(BackendConnectionLost):
        await backend.next_published()
