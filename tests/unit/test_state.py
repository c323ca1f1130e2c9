"""MemoryStateStore: the latest message per group, with an expiry, on a clock the test moves."""

from __future__ import annotations

import pytest

from starlette_dream_ws import state as state_module
from starlette_dream_ws.state import MemoryStateStore, RedisStateStore, create_state_store

pytestmark = pytest.mark.anyio


class Clock:
    """Stands in for the `time` module inside `starlette_dream_ws.state` only.

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
    monkeypatch.setattr(state_module, "time", fake)
    return fake


async def test_remember_then_latest() -> None:
    store = MemoryStateStore()
    assert await store.latest("dream_images_1") is None
    await store.remember("dream_images_1", '{"n":1}', 60)
    await store.remember("dream_images_2", '{"n":2}', 60)
    assert await store.latest("dream_images_1") == '{"n":1}'
    assert await store.latest("dream_images_2") == '{"n":2}'
    await store.remember("dream_images_1", '{"n":3}', 60)
    assert await store.latest("dream_images_1") == '{"n":3}'
    assert len(store) == 2


async def test_entries_expire_after_ttl(clock: Clock) -> None:
    store = MemoryStateStore()
    await store.remember("g", "text", 10)
    clock.advance(9.9)
    assert await store.latest("g") == "text"
    clock.advance(0.2)
    assert await store.latest("g") is None
    assert len(store) == 0


async def test_expired_entries_are_purged_so_the_store_stays_bounded(clock: Clock) -> None:
    store = MemoryStateStore()
    # One new group per second for a long time, each kept 10 seconds, none ever read.
    for n in range(1000):
        await store.remember(f"dream_images_{n}", "x", 10)
        clock.advance(1)
        assert len(store) <= 10
    assert len(store) == 10
    # Reading also purges: nothing is left once every entry has expired.
    clock.advance(10)
    assert await store.latest("anything") is None
    assert len(store) == 0


async def test_overwriting_a_key_refreshes_its_expiry(clock: Clock) -> None:
    store = MemoryStateStore()
    await store.remember("a", "a1", 10)
    clock.advance(5)
    await store.remember("b", "b1", 10)  # expires at +15
    clock.advance(3)
    await store.remember("a", "a2", 10)  # written at +8: expires at +18, not +10
    clock.advance(4)  # +12
    assert await store.latest("a") == "a2"
    assert await store.latest("b") == "b1"
    clock.advance(4)  # +16
    assert await store.latest("b") is None
    assert await store.latest("a") == "a2"
    assert len(store) == 1
    clock.advance(2)  # +18
    assert await store.latest("a") is None
    assert len(store) == 0


async def test_close_forgets_everything() -> None:
    store = MemoryStateStore()
    await store.remember("g", "text", 10)
    await store.close()
    assert await store.latest("g") is None
    assert len(store) == 0


async def test_an_entry_with_a_shorter_ttl_expires_behind_a_longer_one(clock: Clock) -> None:
    store = MemoryStateStore()
    await store.remember("long", "kept", 100)
    await store.remember("short", "stale", 1)
    clock.advance(5)
    assert await store.latest("long") == "kept"
    assert await store.latest("short") is None


async def test_create_state_store_picks_the_store_by_scheme() -> None:
    assert isinstance(create_state_store("memory://"), MemoryStateStore)
    # Building the Redis store opens no connection yet.
    redis_store = create_state_store("redis://127.0.0.1:1/0")
    assert isinstance(redis_store, RedisStateStore)
    await redis_store.close()
