"""GroupLayer: fan-out, concurrent joins, retries, reconnects and life cycle.

The fake broker below stands in for Redis: every backend the factory builds is one
connection to it, a publish reaches the connections subscribed to the channel at that
moment, and a test can cut a connection, refuse connects and fail publishes on demand.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from starlette_dream_ws import BackendUnavailable, GroupLayer, PublishError, Settings
from starlette_dream_ws.groups import Backend, GroupEvent, History, Position, Published
from starlette_dream_ws.groups.backends.memory import MemoryBackend

TIMEOUT = 2.0
#: The fake broker's one history: it never loses one.
EPOCH = "fake"

pytestmark = pytest.mark.anyio


def fast_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "publish_backoff": 0.001,
        "publish_backoff_max": 0.002,
        "reconnect_backoff": 0.001,
        "publish_timeout": 1.0,
    }
    values.update(overrides)
    return Settings(**values)


class Recorder:
    """A group member that keeps what it is delivered."""

    def __init__(self, name: str = "member") -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()

    def deliver(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._arrived.set()

    async def received(self, count: int = 1, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        """The first `count` events, waiting for them to arrive."""

        async def wait() -> None:
            while len(self.events) < count:
                self._arrived.clear()
                await self._arrived.wait()

        await asyncio.wait_for(wait(), timeout)
        return [without_position(event) for event in self.events[:count]]

    def __repr__(self) -> str:
        return f"Recorder({self.name})"


def position_fields(position: Position) -> dict[str, Any]:
    return {"seq": position.seq, "epoch": position.epoch}


def without_position(event: dict[str, Any]) -> dict[str, Any]:
    """The event as published: without the `seq` and `epoch` the backend gave it."""
    return {key: value for key, value in event.items() if key not in ("seq", "epoch")}


class Exploding:
    """A member whose deliver always fails."""

    def __init__(self) -> None:
        self.calls = 0

    def deliver(self, event: dict[str, Any]) -> None:
        self.calls += 1
        raise RuntimeError("this member is broken")


class Hub:
    """A fake broker shared by every backend its factory builds, with switches for failures.

    It keeps each channel's history with positions (a counter per channel), as the backend
    contract asks, so that catch-up after a lost connection can be tested here.
    """

    def __init__(self) -> None:
        self.backends: list[FakeBackend] = []
        self.connect_attempts = 0
        #: The next N connects fail.
        self.connect_failures = 0
        #: The next N publishes fail with `publish_error`.
        self.publish_failures = 0
        self.publish_error: type[Exception] = ConnectionError
        self.publish_attempts = 0
        self.raised: list[Exception] = []
        #: Channels subscribed, one by one, and the channels of each subscribe call (a batch).
        self.subscribes: list[str] = []
        self.batches: list[list[str]] = []
        self.unsubscribe_batches: list[list[str]] = []
        self.subscribe_error: Exception | None = None
        self.unsubscribes: list[str] = []
        #: While set, connects and subscribes wait for these gates (to make calls overlap).
        self.connect_gate: asyncio.Event | None = None
        self.subscribe_gate: asyncio.Event | None = None
        self.history: dict[str, list[Published]] = {}
        self._changed = asyncio.Condition()

    def factory(self, url: str) -> Backend:
        backend = FakeBackend(self)
        self.backends.append(backend)
        return backend

    async def changed(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    def append(self, channel: str, text: str) -> Published:
        """Keep a message in the channel's history, at the next position."""
        kept = self.history.setdefault(channel, [])
        published = Published(channel, text, Position(EPOCH, len(kept) + 1))
        kept.append(published)
        return published

    def position(self, channel: str) -> Position:
        return Position(EPOCH, len(self.history.get(channel, [])))

    def deliver_raw(self, channel: str, message: Any, position: Position | None = None) -> None:
        """Put a message on the wire as another process might, bypassing `GroupLayer.publish`."""
        for backend in self.backends:
            if backend.connected and channel in backend.channels:
                backend.queue.put_nowait(Published(channel, message, position))


class FakeBackend:
    """One connection to the fake broker: the whole backend contract."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.queue: asyncio.Queue[Published | BaseException] = asyncio.Queue()
        self.channels: set[str] = set()
        self.connected = False
        self.disconnected = False

    async def connect(self) -> None:
        hub = self.hub
        hub.connect_attempts += 1
        await hub.changed()
        if hub.connect_gate is not None:
            await hub.connect_gate.wait()
        if hub.connect_failures > 0:
            hub.connect_failures -= 1
            raise ConnectionRefusedError("fake broker refuses connections")
        self.connected = True
        await hub.changed()

    async def disconnect(self) -> None:
        self.connected = False
        self.disconnected = True
        await self.hub.changed()

    async def subscribe(self, channels: Sequence[str]) -> None:
        hub = self.hub
        hub.subscribes.extend(channels)
        hub.batches.append(list(channels))
        await hub.changed()
        if hub.subscribe_gate is not None:
            await hub.subscribe_gate.wait()
        if hub.subscribe_error is not None:
            raise hub.subscribe_error
        self.channels.update(channels)

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        self.hub.unsubscribes.extend(channels)
        self.hub.unsubscribe_batches.append(list(channels))
        self.channels.difference_update(channels)
        await self.hub.changed()

    async def publish(self, channel: str, text: str) -> Position:
        hub = self.hub
        hub.publish_attempts += 1
        if hub.publish_failures > 0:
            hub.publish_failures -= 1
            error = hub.publish_error("fake publish failure")
            hub.raised.append(error)
            raise error
        published = hub.append(channel, text)
        hub.deliver_raw(channel, text, published.position)
        return hub.position(channel)

    async def next_published(self) -> Published:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def history(self, channel: str, after: Position | None) -> History:
        kept = self.hub.history.get(channel, [])
        return History(self.hub.position(channel), [p for p in kept if p.position and p.position.follows(after)])

    async def positions(self, channels: Sequence[str]) -> list[Position]:
        return [self.hub.position(channel) for channel in channels]

    async def latest(self, channel: str) -> Published | None:
        kept = self.hub.history.get(channel)
        return kept[-1] if kept else None

    def lose_connection(self) -> None:
        """The broker drops this connection: the reader's next read fails."""
        self.connected = False
        self.queue.put_nowait(ConnectionResetError("fake connection lost"))


class CountingMemoryBackend(MemoryBackend):
    """The memory backend, with subscribe calls counted (and gated) by a Hub."""

    def __init__(self, url: str, hub: Hub) -> None:
        super().__init__(url)
        self.hub = hub

    async def subscribe(self, channels: Sequence[str]) -> None:
        self.hub.subscribes.extend(channels)
        await self.hub.changed()
        if self.hub.subscribe_gate is not None:
            await self.hub.subscribe_gate.wait()
        await super().subscribe(channels)

    async def unsubscribe(self, channels: Sequence[str]) -> None:
        self.hub.unsubscribes.extend(channels)
        await super().unsubscribe(channels)
        await self.hub.changed()


def make_layer(kind: str, hub: Hub, **settings: Any) -> GroupLayer:
    if kind == "memory":
        return GroupLayer(fast_settings(**settings), backend_factory=lambda url: CountingMemoryBackend(url, hub))
    return GroupLayer(fast_settings(**settings), backend_factory=hub.factory)


@pytest.fixture(params=["memory", "fake"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- fan-out ----------------------------------------------------------------------------------


async def test_memory_url_without_factory_reaches_members() -> None:
    layer = GroupLayer(Settings(broadcast_url="memory://"))
    member = Recorder()
    try:
        await layer.join("g", member)
        await layer.publish("g", {"type": "hello", "n": 1})
        assert await member.received() == [{"type": "hello", "n": 1}]
    finally:
        await layer.disconnect()


async def test_publish_reaches_every_member_of_the_group_and_no_other(kind: str) -> None:
    hub = Hub()
    layer = make_layer(kind, hub)
    a1, a2, a3, b = Recorder("a1"), Recorder("a2"), Recorder("a3"), Recorder("b")
    try:
        for member in (a1, a2, a3):
            await layer.join("group_a", member)
        await layer.join("group_b", b)
        assert layer.local_members("group_a") == 3
        assert layer.local_members("group_b") == 1

        await layer.publish("group_a", {"type": "update", "to": "a"})
        await layer.publish("group_b", {"type": "update", "to": "b"})

        assert await a1.received() == [{"type": "update", "to": "a"}]
        first = a1.events[0]
        # Decoded once per process: every member of the group gets the very same dict.
        await a2.received()
        await a3.received()
        assert a2.events[0] is first and a3.events[0] is first
        # group_b's member sees only group_b's message: the group_a one, published first on the
        # same connection, would have arrived before it.
        assert await b.received() == [{"type": "update", "to": "b"}]
        assert a1.events == [first]
        # ... and encoded once: it carries the text it arrived as, with its position, and
        # nobody may change it.
        assert isinstance(first, GroupEvent)
        assert first.group == "group_a" and first.position is not None
        assert json.loads(first.text) == {"type": "update", "to": "a", **position_fields(first.position)}
        assert json.loads(first.text) == first
        with pytest.raises(TypeError):
            first["to"] = "b"
        with pytest.raises(TypeError):
            first.pop("to")
        assert without_position({**first, "to": "b"}) == {"type": "update", "to": "b"}
    finally:
        await layer.disconnect()


async def test_two_hundred_concurrent_joiners_all_receive_and_share_one_subscription(kind: str) -> None:
    hub = Hub()
    layer = make_layer(kind, hub)
    await layer.connect()
    members = [Recorder(str(i)) for i in range(200)]
    hub.subscribe_gate = asyncio.Event()
    joins = [asyncio.ensure_future(layer.join("dream_images_1", m)) for m in members]

    async def open_gate_once_all_wait() -> None:
        # The first joiner is inside the backend's subscribe; the other 199 ran in the same
        # loop pass and wait for that subscription: none may return before it is made.
        await hub.until(lambda: len(hub.subscribes) >= 1)
        assert layer.local_members("dream_images_1") == 200
        assert hub.subscribes == ["dream_images_1"]
        assert not any(join.done() for join in joins)
        assert hub.subscribe_gate is not None
        hub.subscribe_gate.set()

    try:
        await asyncio.wait_for(asyncio.gather(*joins, open_gate_once_all_wait()), TIMEOUT)
        hub.subscribe_gate = None
        assert hub.subscribes == ["dream_images_1"]

        await layer.publish("dream_images_1", {"type": "image_update", "n": 1})
        for member in members:
            assert await member.received() == [{"type": "image_update", "n": 1}]

        await asyncio.gather(*(layer.leave("dream_images_1", m) for m in members))
        assert layer.local_members("dream_images_1") == 0
        # Undone by the layer's subscriber task, in the order subscriptions were asked for.
        await hub.until(lambda: hub.unsubscribes == ["dream_images_1"])

        # Join again after everyone left: a fresh subscription that works.
        again = Recorder("again")
        await layer.join("dream_images_1", again)
        assert hub.subscribes == ["dream_images_1", "dream_images_1"]
        await layer.publish("dream_images_1", {"type": "image_update", "n": 2})
        assert await again.received() == [{"type": "image_update", "n": 2}]
        assert all(len(m.events) == 1 for m in members)
    finally:
        await layer.disconnect()


async def test_leaving_while_the_subscription_is_being_made_unsubscribes_after_it(kind: str) -> None:
    hub = Hub()
    layer = make_layer(kind, hub)
    await layer.connect()
    member = Recorder()
    hub.subscribe_gate = asyncio.Event()
    try:
        join = asyncio.ensure_future(layer.join("g", member))
        await hub.until(lambda: hub.subscribes == ["g"])
        await layer.leave("g", member)
        assert hub.unsubscribes == []  # not before the subscription it would undo
        hub.subscribe_gate.set()
        await asyncio.wait_for(join, TIMEOUT)
        await hub.until(lambda: hub.unsubscribes == ["g"])
        assert layer.local_members("g") == 0
    finally:
        await layer.disconnect()


def batching_layer() -> tuple[GroupLayer, Hub]:
    hub = Hub()
    return GroupLayer(fast_settings(), backend_factory=hub.factory), hub


async def test_new_groups_joined_at_once_are_subscribed_in_batches() -> None:
    layer, hub = batching_layer()
    await layer.connect()
    groups = [f"dream_images_{n}" for n in range(500)]
    members = {group: Recorder(group) for group in groups}
    hub.subscribe_gate = asyncio.Event()
    try:
        # Joins made in one pass of the loop go in one batch; those made while it is under way
        # wait, and go together in the next.
        joins = [asyncio.ensure_future(layer.join(group, members[group])) for group in groups[:300]]
        await hub.until(lambda: len(hub.batches) == 1)
        joins += [asyncio.ensure_future(layer.join(group, members[group])) for group in groups[300:]]
        await asyncio.sleep(0)  # one pass of the loop: the new joins queue up
        assert not any(join.done() for join in joins)
        hub.subscribe_gate.set()
        await asyncio.wait_for(asyncio.gather(*joins), TIMEOUT)
        assert [len(batch) for batch in hub.batches] == [300, 200]
        assert sorted(group for batch in hub.batches for group in batch) == sorted(groups)
        assert len(hub.subscribes) == 500  # each channel once
        for group in groups:
            await layer.publish(group, {"type": "image_update", "group": group})
        for group in groups:
            assert await members[group].received() == [{"type": "image_update", "group": group}]
    finally:
        await layer.disconnect()


async def test_a_failed_batch_fails_each_of_its_joins_and_a_later_join_works() -> None:
    layer, hub = batching_layer()
    await layer.connect()
    hub.subscribe_error = ConnectionResetError("fake subscribe failure")
    try:
        outcomes = await asyncio.gather(*(layer.join(f"g{n}", Recorder()) for n in range(5)), return_exceptions=True)
        assert all(isinstance(outcome, BackendUnavailable) for outcome in outcomes), outcomes
        assert all(layer.local_members(f"g{n}") == 0 for n in range(5))
        hub.subscribe_error = None
        member = Recorder()
        await layer.join("g0", member)
        await layer.publish("g0", {"type": "image_update"})
        assert await member.received() == [{"type": "image_update"}]
    finally:
        await layer.disconnect()


async def test_a_joiner_that_gives_up_before_its_batch_leaves_no_subscription() -> None:
    layer, hub = batching_layer()
    await layer.connect()
    hub.subscribe_gate = asyncio.Event()
    try:
        first = asyncio.ensure_future(layer.join("a", Recorder()))
        await hub.until(lambda: len(hub.batches) == 1)
        gives_up = asyncio.ensure_future(layer.join("b", Recorder()))
        stays = asyncio.ensure_future(layer.join("c", Recorder()))
        await asyncio.sleep(0)  # one pass of the loop: both joins run up to their wait
        assert layer.local_members("b") == 1 and layer.local_members("c") == 1
        gives_up.cancel()
        hub.subscribe_gate.set()
        await asyncio.wait_for(asyncio.gather(first, stays), TIMEOUT)
        assert gives_up.cancelled()
        assert hub.batches == [["a"], ["c"]]
        assert layer.local_members("b") == 0
        assert all("b" not in backend.channels for backend in hub.backends)
    finally:
        await layer.disconnect()


async def test_leave_of_unknown_member_or_group_is_harmless(kind: str) -> None:
    hub = Hub()
    layer = make_layer(kind, hub)
    member = Recorder()
    try:
        await layer.join("g", member)
        await layer.leave("g", Recorder("stranger"))
        await layer.leave("nowhere", member)
        assert layer.local_members("g") == 1
        # Changes of subscriptions are made in order: once a later join is through, any
        # unsubscribe asked for above would have been made.
        await layer.join("h", Recorder())
        assert hub.unsubscribes == []
    finally:
        await layer.disconnect()


async def test_a_failing_member_does_not_stop_delivery_to_the_others(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    hub = Hub()
    layer = make_layer(kind, hub)
    broken = Exploding()
    good = [Recorder(str(i)) for i in range(3)]
    try:
        await layer.join("g", broken)
        for member in good:
            await layer.join("g", member)
        with caplog.at_level(logging.ERROR, logger="starlette_dream_ws.layer"):
            await layer.publish("g", {"type": "one"})
            await layer.publish("g", {"type": "two"})
            for member in good:
                assert await member.received(2) == [{"type": "one"}, {"type": "two"}]
        assert broken.calls == 2
        assert layer.connected
        assert "delivering to a member of g failed" in caplog.text
    finally:
        await layer.disconnect()


@pytest.mark.parametrize(
    "junk",
    ["not json", "", "[1, 2]", '"just a string"', "null", '{"no_type": 1}', '{"type": 5}', '{"type": null}'],
)
async def test_junk_on_the_backend_is_dropped_and_the_reader_survives(kind: str, junk: str) -> None:
    hub = Hub()
    created: list[Backend] = []

    def factory(url: str) -> Backend:
        backend = CountingMemoryBackend(url, hub) if kind == "memory" else hub.factory(url)
        created.append(backend)
        return backend

    layer = GroupLayer(fast_settings(), backend_factory=factory)
    member = Recorder()
    try:
        await layer.join("g", member)
        await created[-1].publish("g", junk)
        await layer.publish("g", {"type": "valid"})
        assert await member.received() == [{"type": "valid"}]
        assert layer.connected and layer.healthy
        assert len(created) == 1
    finally:
        await layer.disconnect()


async def test_deeply_nested_json_does_not_kill_the_reader() -> None:
    hub = Hub()
    created: list[Backend] = []

    def factory(url: str) -> Backend:
        created.append(CountingMemoryBackend(url, hub))
        return created[-1]

    layer = GroupLayer(fast_settings(), backend_factory=factory)
    member = Recorder()
    try:
        await layer.join("g", member)
        # Valid JSON, but deeper than the decoder's recursion limit: RecursionError, not ValueError.
        await created[0].publish("g", '{"type":"x","a":' + "[" * 100_000 + "]" * 100_000 + "}")
        await layer.publish("g", {"type": "valid"})
        assert await member.received() == [{"type": "valid"}]
        assert len(created) == 1
    finally:
        await layer.disconnect()


async def test_a_message_that_is_not_text_does_not_strand_the_members() -> None:
    hub = Hub()
    layer = GroupLayer(fast_settings(), backend_factory=hub.factory)
    member = Recorder()
    await layer.join("g", member)
    reader = layer._reader
    assert reader is not None
    try:
        hub.deliver_raw("g", None)
        await layer.publish("g", {"type": "valid"})
        assert await member.received(timeout=0.5) == [{"type": "valid"}]
    finally:
        await layer.disconnect()
        if reader.done() and not reader.cancelled():
            reader.exception()  # retrieved, so that only the missed delivery is reported


# -- latest state -----------------------------------------------------------------------------


async def test_the_last_publish_is_the_latest(kind: str) -> None:
    hub = Hub()
    layer = make_layer(kind, hub)
    try:
        assert await layer.latest("unknown") is None
        await layer.publish("g", {"type": "image_update", "n": 1})
        await layer.publish("g", {"type": "image_update", "n": 2})
        await layer.publish("other", {"type": "image_update", "n": 3})
        latest = await layer.latest("g")
        assert latest is not None and latest.position is not None
        assert latest == {"type": "image_update", "n": 2, **position_fields(latest.position)}
        assert latest.position.seq == 2 and latest.group == "g"
        other = await layer.latest("other")
        assert other is not None and without_position(other) == {"type": "image_update", "n": 3}
        assert await layer.latest("nobody") is None
    finally:
        await layer.disconnect()


# -- publish retries --------------------------------------------------------------------------


async def test_publish_retries_transient_failures_and_delivers_once() -> None:
    hub = Hub()
    layer = GroupLayer(fast_settings(publish_retries=5), backend_factory=hub.factory)
    member = Recorder()
    try:
        await layer.join("g", member)
        hub.publish_failures = 3
        await asyncio.wait_for(layer.publish("g", {"type": "update", "n": 1}), TIMEOUT)
        assert hub.publish_attempts == 4
        await layer.publish("g", {"type": "update", "n": 2})
        # Exactly once: the next message is the one after it.
        assert await member.received(2) == [{"type": "update", "n": 1}, {"type": "update", "n": 2}]
        assert len(member.events) == 2
    finally:
        await layer.disconnect()


async def test_publish_raises_publish_error_after_every_retry_failed() -> None:
    hub = Hub()
    layer = GroupLayer(fast_settings(publish_retries=3), backend_factory=hub.factory)
    member = Recorder()
    try:
        await layer.join("g", member)
        hub.publish_failures = 100
        with pytest.raises(PublishError) as caught:
            await asyncio.wait_for(layer.publish("g", {"type": "update"}), TIMEOUT)
        assert hub.publish_attempts == 3 + 1
        assert caught.value.__cause__ is hub.raised[-1]
        assert "4 attempts" in str(caught.value)
        hub.publish_failures = 0
        await layer.publish("g", {"type": "later"})
        assert await member.received() == [{"type": "later"}]
    finally:
        await layer.disconnect()


async def test_publish_retries_zero_means_one_attempt() -> None:
    hub = Hub()
    layer = GroupLayer(fast_settings(publish_retries=0), backend_factory=hub.factory)
    try:
        await layer.connect()
        hub.publish_failures = 1
        with pytest.raises(PublishError):
            await layer.publish("g", {"type": "update"})
        assert hub.publish_attempts == 1
    finally:
        await layer.disconnect()


@pytest.mark.parametrize("error", [ValueError, TypeError])
async def test_programming_errors_from_the_backend_are_raised_at_once(error: type[Exception]) -> None:
    hub = Hub()
    layer = GroupLayer(fast_settings(publish_retries=5), backend_factory=hub.factory)
    try:
        await layer.connect()
        hub.publish_failures = 1
        hub.publish_error = error
        with pytest.raises(error) as caught:
            await layer.publish("g", {"type": "update"})
        assert caught.value is hub.raised[-1]
        assert hub.publish_attempts == 1
    finally:
        await layer.disconnect()


async def test_publish_connects_lazily_and_fails_with_publish_error_when_backend_is_down() -> None:
    hub = Hub()
    hub.connect_failures = 100
    layer = GroupLayer(fast_settings(publish_retries=2), backend_factory=hub.factory)
    try:
        with pytest.raises(PublishError) as caught:
            await layer.publish("g", {"type": "update"})
        assert isinstance(caught.value.__cause__, BackendUnavailable)
        assert hub.connect_attempts == 3
        # Every backend that failed to connect was closed again.
        assert all(backend.disconnected for backend in hub.backends)
        assert not layer.connected
    finally:
        await layer.disconnect()


# -- reconnect --------------------------------------------------------------------------------


async def test_lost_connection_is_re_established_and_groups_subscribed_again() -> None:
    hub = Hub()
    layer = GroupLayer(fast_settings(), backend_factory=hub.factory)
    a, b = Recorder("a"), Recorder("b")
    try:
        await layer.join("g1", a)
        await layer.join("g2", b)
        await layer.join("g2", Recorder("b2"))
        assert layer.healthy and layer.reconnects == 0
        first = hub.backends[0]
        hub.connect_failures = 3  # the broker stays down a little while

        first.lose_connection()
        # The reconnect has begun once the layer tries a second connection.
        await hub.until(lambda: hub.connect_attempts >= 2)
        assert not layer.healthy
        assert layer.connected  # the reader lives on, reconnecting

        # A join while reconnecting waits until the layer is healthy, then succeeds.
        c = Recorder("c")
        await asyncio.wait_for(layer.join("g3", c), TIMEOUT)
        assert layer.healthy
        assert layer.reconnects == 1
        assert hub.connect_attempts == 1 + 3 + 1
        assert len(hub.backends) == 5
        assert first.disconnected
        assert all(backend.disconnected for backend in hub.backends[1:4])
        current = hub.backends[-1]
        assert current.connected and not current.disconnected
        assert current.channels == {"g1", "g2", "g3"}

        await layer.publish("g1", {"type": "after", "g": 1})
        await layer.publish("g2", {"type": "after", "g": 2})
        await layer.publish("g3", {"type": "after", "g": 3})
        assert await a.received() == [{"type": "after", "g": 1}]
        assert await b.received() == [{"type": "after", "g": 2}]
        assert await c.received() == [{"type": "after", "g": 3}]
    finally:
        await layer.disconnect()


async def test_reconnects_again_after_a_second_loss() -> None:
    hub = Hub()
    layer = GroupLayer(fast_settings(), backend_factory=hub.factory)
    member = Recorder()
    try:
        await layer.join("g", member)
        for round_ in (1, 2):
            hub.backends[-1].lose_connection()
            await hub.until(lambda round_=round_: len(hub.backends) == round_ + 1)
            await asyncio.wait_for(layer.join("other", Recorder()), TIMEOUT)  # waits for health
            assert layer.reconnects == round_
        await layer.publish("g", {"type": "still here"})
        assert await member.received() == [{"type": "still here"}]
    finally:
        await layer.disconnect()


async def test_join_raises_backend_unavailable_when_the_backend_stays_down() -> None:
    hub = Hub()
    layer = GroupLayer(fast_settings(publish_timeout=0.05), backend_factory=hub.factory)
    existing = Recorder()
    before = asyncio.all_tasks()
    try:
        await layer.join("g", existing)
        hub.connect_failures = 10**9
        hub.backends[0].lose_connection()
        await hub.until(lambda: hub.connect_attempts >= 2)

        newcomer = Recorder()
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(layer.join("new", newcomer), TIMEOUT)
        assert layer.local_members("new") == 0
        assert not layer.healthy
        # The layer keeps trying meanwhile.
        attempts = hub.connect_attempts
        await hub.until(lambda: hub.connect_attempts > attempts)
    finally:
        # Disconnecting in the middle of a reconnect ends the reader too.
        await layer.disconnect()
    assert asyncio.all_tasks() == before
    assert not layer.connected


async def test_publish_during_a_reconnect_waits_for_the_backend_and_is_delivered() -> None:
    hub = Hub()
    layer = GroupLayer(fast_settings(), backend_factory=hub.factory)
    member = Recorder()
    try:
        await layer.join("g", member)
        hub.connect_failures = 3
        hub.backends[0].lose_connection()
        await hub.until(lambda: hub.connect_attempts >= 2)  # old backend gone, new one not yet
        assert not layer.healthy
        await asyncio.wait_for(layer.publish("g", {"type": "during reconnect"}), TIMEOUT)
        assert layer.healthy and layer.reconnects == 1
        # Published once the groups were subscribed again, so the existing member gets it.
        assert await member.received() == [{"type": "during reconnect"}]
        assert hub.publish_attempts == 1
    finally:
        await layer.disconnect()


# -- life cycle -------------------------------------------------------------------------------


async def test_disconnect_leaves_no_task_and_the_layer_can_connect_again(kind: str) -> None:
    hub = Hub()
    layer = make_layer(kind, hub)
    before = asyncio.all_tasks()
    member = Recorder()
    await layer.join("g", member)
    assert layer.connected and layer.healthy
    assert len(asyncio.all_tasks() - before) == 2  # the reader and the subscriber of new groups
    await layer.disconnect()
    assert asyncio.all_tasks() == before
    assert not layer.connected and not layer.healthy
    assert layer.local_members("g") == 0
    await layer.disconnect()  # twice is harmless

    again = Recorder()
    try:
        await layer.join("g", again)
        await layer.publish("g", {"type": "second life"})
        assert await again.received() == [{"type": "second life"}]
        assert member.events == []
    finally:
        await layer.disconnect()
    assert asyncio.all_tasks() == before


async def test_disconnect_closes_the_backend() -> None:
    hub = Hub()
    layer = GroupLayer(fast_settings(), backend_factory=hub.factory)
    await layer.connect()
    await layer.disconnect()
    assert hub.backends[0].disconnected


async def test_concurrent_connects_build_one_backend() -> None:
    hub = Hub()
    layer = GroupLayer(fast_settings(), backend_factory=hub.factory)
    hub.connect_gate = asyncio.Event()

    async def open_gate() -> None:
        await hub.until(lambda: hub.connect_attempts >= 1)
        assert hub.connect_gate is not None
        hub.connect_gate.set()

    try:
        await asyncio.wait_for(asyncio.gather(*(layer.connect() for _ in range(10)), open_gate()), TIMEOUT)
        assert len(hub.backends) == 1
        assert hub.connect_attempts == 1
        assert layer.connected and layer.healthy
        await layer.connect()
        assert len(hub.backends) == 1
    finally:
        await layer.disconnect()


async def test_connect_failure_raises_backend_unavailable_and_a_later_connect_works() -> None:
    hub = Hub()
    hub.connect_failures = 1
    layer = GroupLayer(fast_settings(), backend_factory=hub.factory)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await layer.connect()
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)
        assert hub.backends[0].disconnected
        assert not layer.connected
        await layer.connect()
        assert layer.healthy
    finally:
        await layer.disconnect()


async def test_groups_left_together_are_unsubscribed_in_one_batch_and_a_rejoin_subscribes_again() -> None:
    layer, hub = batching_layer()
    await layer.connect()
    members = {f"g{n}": Recorder(f"g{n}") for n in range(50)}
    try:
        await asyncio.gather(*(layer.join(group, member) for group, member in members.items()))
        await asyncio.gather(*(layer.leave(group, member) for group, member in members.items()))
        # Left and joined again before the unsubscribe is made: undone, then made again, in order.
        again = Recorder("again")
        await layer.join("g0", again)
        assert hub.unsubscribe_batches == [sorted(members, key=lambda g: int(g[1:]))]
        assert [len(batch) for batch in hub.batches] == [50, 1]
        await layer.publish("g0", {"type": "image_update"})
        assert await again.received() == [{"type": "image_update"}]
        assert all(layer.local_members(group) == 0 for group in members if group != "g0")
    finally:
        await layer.disconnect()


async def test_after_a_reconnect_the_groups_are_subscribed_again_in_one_batch() -> None:
    layer, hub = batching_layer()
    members = {f"g{n}": Recorder(f"g{n}") for n in range(20)}
    try:
        await asyncio.gather(*(layer.join(group, member) for group, member in members.items()))
        first = hub.backends[0]
        first.lose_connection()
        await hub.until(lambda: len(hub.backends) == 2 and len(hub.batches) >= 2)
        assert sorted(hub.batches[-1]) == sorted(members)
        assert len(hub.batches) == 2  # the first subscription, then the reconnect's, one batch each
        await asyncio.wait_for(layer.join("late", Recorder()), TIMEOUT)  # healthy again
        assert layer.reconnects == 1
        for group in members:
            await layer.publish(group, {"type": "after", "group": group})
        for group, member in members.items():
            assert await member.received() == [{"type": "after", "group": group}]
    finally:
        await layer.disconnect()
