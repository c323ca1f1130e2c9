"""Publishing on a real Redis: concurrent publishes go out pipelined, every one arrives, each
group in order; a lost script cache and callers that give up are handled without a retry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from starlette_dream_ws import GroupLayer, Settings
from starlette_dream_ws.groups import BackendConnectionLost
from starlette_dream_ws.groups.backends import redis as redis_backend
from starlette_dream_ws.groups.backends.pipelining import MAX_BATCH
from starlette_dream_ws.groups.backends.redis import RedisBackend
from tests.support.redis import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

TIMEOUT = 10.0


class Inbox:
    """A group member that keeps the `n` of each event, per group."""

    def __init__(self) -> None:
        self.seen: dict[str, list[int]] = {}
        self.count = 0
        self.changed = asyncio.Event()

    def deliver(self, event: dict[str, Any]) -> None:
        self.seen.setdefault(event["group"], []).append(event["n"])
        self.count += 1
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while self.count < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def layers(redis_server: RedisServer) -> AsyncIterator[tuple[GroupLayer, GroupLayer]]:
    settings = Settings(broadcast_url=redis_server.url, publish_backoff=0.01)
    publisher, listener = GroupLayer(settings), GroupLayer(settings)
    try:
        yield publisher, listener
    finally:
        await publisher.disconnect()
        await listener.disconnect()


async def test_concurrent_publishes_all_arrive_in_order_per_group(layers: tuple[GroupLayer, GroupLayer]) -> None:
    publisher, listener = layers
    groups, per_group = 40, 3 * MAX_BATCH // 4  # more in flight than one pipeline holds
    inbox = Inbox()
    for g in range(groups):
        await listener.join(f"g{g}", inbox)

    async def publish_in_order(group: str) -> None:
        for n in range(per_group):
            await publisher.publish(group, {"type": "update", "group": group, "n": n})

    await asyncio.gather(*(publish_in_order(f"g{g}") for g in range(groups)))
    await inbox.wait_for(groups * per_group)

    assert inbox.seen == {f"g{g}": list(range(per_group)) for g in range(groups)}
    assert publisher.publish_metrics.retries == 0
    assert publisher.publish_metrics.published == groups * per_group


async def test_a_flushed_script_cache_costs_no_retry(
    layers: tuple[GroupLayer, GroupLayer], redis_server: RedisServer
) -> None:
    publisher, listener = layers
    inbox = Inbox()
    await listener.join("g", inbox)
    await publisher.publish("g", {"type": "update", "group": "g", "n": 0})
    with redis.Redis.from_url(redis_server.url) as client:
        client.script_flush()
        assert client.script_exists(_publish_sha()) == [False]
    await asyncio.gather(*(publisher.publish("g", {"type": "update", "group": "g", "n": n}) for n in range(1, 20)))
    await inbox.wait_for(20)

    assert inbox.seen["g"] == list(range(20))
    assert publisher.publish_metrics.retries == 0
    with redis.Redis.from_url(redis_server.url) as client:
        # Every publish also went to the group's history.
        assert client.xlen(redis_backend.keys("g")[1]) == 20


async def test_a_caller_that_gives_up_does_not_hold_up_the_others(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url)
    await backend.connect()
    try:
        # Queued together: the first is cancelled before the writer gets to run.
        given_up = asyncio.ensure_future(backend.publish("g", json.dumps({"n": 0})))
        others = [asyncio.ensure_future(backend.publish("g", json.dumps({"n": n}))) for n in range(1, 5)]
        await asyncio.sleep(0)
        given_up.cancel()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*others)
        assert given_up.cancelled()
        latest = await backend.latest("g")
        assert latest is not None and json.loads(latest.text) == {"n": 4}
        history = await backend.history("g", None)
        assert [json.loads(event.text)["n"] for event in history.messages] == [1, 2, 3, 4]
        assert [event.position.seq for event in history.messages if event.position] == [1, 2, 3, 4]
    finally:
        await backend.disconnect()


async def test_disconnect_fails_waiting_publishes_instead_of_leaving_them_waiting(redis_server: RedisServer) -> None:
    backend = RedisBackend(redis_server.url)
    await backend.connect()
    waiting = [asyncio.ensure_future(backend.publish("g", json.dumps({"n": n}))) for n in range(50)]
    await asyncio.sleep(0)
    async with asyncio.timeout(TIMEOUT):
        await backend.disconnect()
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    # Each either went out before the disconnect or was told it did not.
    assert all(o is None or isinstance(o, BackendConnectionLost) for o in outcomes), outcomes
    with pytest.raises(BackendConnectionLost):
        await backend.publish("g", "{}")


def _publish_sha() -> str:
    return redis_backend._PUBLISH_SHA


async def test_many_new_groups_joined_at_once_each_get_their_own_updates(
    layers: tuple[GroupLayer, GroupLayer],
) -> None:
    publisher, listener = layers
    groups = [f"new{g}" for g in range(300)]
    inboxes = {group: Inbox() for group in groups}
    # One SUBSCRIBE and one pipeline of baseline reads for the lot (`subscribe`, `last_positions`).
    await asyncio.gather(*(listener.join(group, inboxes[group]) for group in groups))
    await asyncio.gather(*(publisher.publish(group, {"type": "update", "group": group, "n": 0}) for group in groups))
    for group in groups:
        await inboxes[group].wait_for(1)
        assert inboxes[group].seen == {group: [0]}
