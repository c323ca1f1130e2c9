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
from starlette_dream_ws.protocol import Position

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


async def test_publishes_get_consecutive_positions_and_reach_subscribers(backend: MemoryBackend) -> None:
    await backend.subscribe(["a"])
    returned = [await backend.publish("a", text) for text in ("1", "2", "3")]
    await backend.publish("b", "elsewhere")
    got = [await backend.next_published() for _ in range(3)]
    assert [(p.channel, p.text) for p in got] == [("a", "1"), ("a", "2"), ("a", "3")]
    assert [p.position for p in got] == returned
    assert [p.seq for p in returned] == [1, 2, 3]
    assert len({p.epoch for p in returned}) == 1


async def test_history_is_capped_and_read_after_a_position(backend: MemoryBackend) -> None:
    positions = [await backend.publish("a", text) for text in ("1", "2", "3", "4")]
    everything = await backend.history("a", None)
    assert everything.current == positions[-1]
    assert [p.text for p in everything.messages] == ["2", "3", "4"]  # history_size=3
    after_two = await backend.history("a", positions[1])
    assert [p.text for p in after_two.messages] == ["3", "4"] and after_two.complete_after(positions[1])
    # The first update is no longer kept: after it, the history is not complete.
    assert not (await backend.history("a", Position(positions[0].epoch, 0))).complete_after(
        Position(positions[0].epoch, 0)
    )
    newest = await backend.history("a", positions[-1])
    assert newest.messages == [] and newest.complete_after(positions[-1])
    # Another epoch's position: the whole history of this one, and not complete after it.
    other = Position("another", 2)
    assert [p.text for p in (await backend.history("a", other)).messages] == ["2", "3", "4"]
    assert not (await backend.history("a", other)).complete_after(other)
    latest = await backend.latest("a")
    assert latest is not None and (latest.text, latest.position) == ("4", positions[-1])
    assert await backend.latest("nothing") is None


async def test_a_channel_without_updates_gets_an_epoch_at_seq_0(backend: MemoryBackend) -> None:
    (first,) = await backend.positions(["new"])
    assert first.seq == 0 and first.epoch
    assert await backend.positions(["new"]) == [first]
    assert await backend.publish("new", "x") == Position(first.epoch, 1)


async def test_a_channel_expires_ttl_after_its_last_publish_and_starts_a_new_epoch(
    clock: Clock, backend: MemoryBackend
) -> None:
    first = await backend.publish("a", "1")
    clock.advance(5)
    await backend.publish("b", "1")
    clock.advance(4.9)
    assert (await backend.latest("a")) is not None
    clock.advance(0.2)
    assert await backend.latest("a") is None
    history = await backend.history("a", first)
    assert history.messages == [] and history.current.epoch != first.epoch
    assert not history.complete_after(first)
    assert (await backend.publish("a", "again")) == Position(history.current.epoch, 1)
    assert (await backend.latest("b")) is not None


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
        latest = await other.latest("a")
        assert latest is not None and latest.text == "from the other"
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
    assert [p.position.seq for p in got if p.position is not None] == list(range(1, 401))


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
